"""The DVC pipeline as a user drives it, in a temporary git repository."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from sipa_core.accelerate import load_early_exit
from sipa_core.accelerate.record import ExitRecord
from sipa_core.checkpoint import load_model, read_checkpoint
from sipa_core.data.prepared import load_prepared
from sipa_core.scoring import count
from sipa_core.train import evaluate, sixteen_bit, normalized

ROOT = Path(__file__).resolve().parents[1]
PATHS = yaml.safe_load((ROOT / "sipa_core/paths.yaml").read_text())["paths"]
pytestmark = pytest.mark.slow  # dvc end to end, in a temporary repository


def run(cmd, cwd, env, check=True):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path)


def make_project(tmp_path):
    """A copy of the pipeline (code, dvc.yaml, params.yaml) in a fresh git + DVC repo."""
    dst = tmp_path / "proj"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("sipa_core", "stages", "datasets", "networks"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, dst / name)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run(["git", "init", "-q", "-b", "main"], dst, env)
    run(["dvc", "init", "-q"], dst, env)
    shutil.copy(ROOT / ".dvcignore", dst / ".dvcignore")  # byte code beside the code deps is not a change
    return dst, env


def set_params(path: Path, section="prepare", **values):
    params = yaml.safe_load((path / "params.yaml").read_text())
    params[section].update(values)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


TINY_SEARCH = dict(method="hyperopt", steps=["blocks"], max_evals=2, trial_images_per_class=10,
                   recipe={"epochs": 1, "batch_size": 32})
TINY_IMPROVE = dict(candidates=["larger_lr"], trial_epochs=1, final_epochs=1,
                    base={"batch_size": 32, "lr": 0.01, "schedule": "constant"})


TINY_PRUNE = dict(schedule=[0.3, 0.5, 0.6], epochs=1, max_drop=None)
TINY_ACCELERATE = dict(positions=[2], epochs=1, thresholds=[0.2, 0.4, 0.6, 0.8], max_drop=0.3)
TINY_QUANTIZE = dict(epochs=1, exit_epochs=1, compare_widths=["W4A4"], calibration_batches=1)
TINY_REPORT = dict(latency={"singles": 20, "rounds": 1})  # timed briefly (threads and batch: the defaults)
ALL = {"prepare", "search", "improve", "prune", "accelerate", "quantize", "report"}


def stages_run(output: str) -> set[str]:
    return {name for name in ALL if f"Running stage '{name}'" in output}


def test_whole_pipeline_under_dvc(project, cifar10_jpeg):
    """dvc repro end to end (killed once and resumed), its outputs checked, a remote round trip,
    code changes that mark only their stages, a queued report-only experiment, and one pruning
    experiment in the workspace."""
    path, env = project
    set_params(path, source="imagefolder", root=str(cifar10_jpeg), val_size=50, images_per_class=30,
               test_images_per_class=10)
    set_params(path, "search", **TINY_SEARCH)
    set_params(path, "improve", **TINY_IMPROVE)
    set_params(path, "prune", **TINY_PRUNE)
    set_params(path, "accelerate", **TINY_ACCELERATE)
    set_params(path, "quantize", **TINY_QUANTIZE)
    set_params(path, "report", **TINY_REPORT)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "init"], path, env)

    # `dvc repro` itself killed mid-pipeline (while improve trains), then run again:
    # the finished stages are not redone.
    killed = subprocess.Popen(["dvc", "repro"], cwd=path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.time() + 600
    while not (path / "state/improve").exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    os.killpg(killed.pid, signal.SIGKILL)
    log = killed.communicate()[0].decode()
    assert stages_run(log) == {"prepare", "search", "improve"}, log
    first = run(["dvc", "repro"], path, env)
    assert stages_run(first.stdout) == {"improve", "prune", "accelerate", "quantize", "report"}, first.stdout
    m = json.loads((path / "metrics/prepare.json").read_text())
    assert (m["train_images"], m["val_images"], m["test_images"], m["num_classes"]) == (250, 50, 100, 10)
    assert json.loads((path / "metrics/search.json").read_text())["trials"] == 2
    assert (path / "models/search/arch.yaml").is_file() and (path / "plots/search_trials.csv").is_file()
    _check_improve_metrics(path)
    pr = json.loads((path / "metrics/prune.json").read_text())
    assert pr["chosen_round"] == 3 and pr["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert len((path / "plots/prune_rounds.csv").read_text().splitlines()) == 5
    acc = _check_accelerate_metrics(path)
    quant = json.loads((path / "metrics/quantize.json").read_text())
    assert (quant["weight_bits"], quant["act_bits"]) == (8, 8) and quant["sparsity"] >= quant["input_sparsity"]
    if not acc["passthrough"]:  # the quantizing stage chose its threshold by the rule accelerate recorded
        rule = ExitRecord.of(read_checkpoint(path / PATHS["accelerate"]["out"])).rule
        assert rule.as_record() == {"thresholds": TINY_ACCELERATE["thresholds"], "min_accuracy": None,
                                    "max_drop": 0.3, "allow_no_exit": True}
        if quant["exit_kept"]:
            assert ExitRecord.of(read_checkpoint(path / PATHS["quantize"]["out"])).rule == rule
            assert quant["threshold"] in rule.thresholds and quant["val_accuracy"] >= quant["val_target"] - 1e-9
    assert abs(quant["onnx_accuracy"] - quant["accuracy"]) <= 0.003
    summary = json.loads((path / "metrics/summary.json").read_text())
    assert summary["score"] == quant["score"] and quant["params_score"] < acc["params_score"]
    assert json.loads((path / "info/report.json").read_text())["final_stage"] == "quantize"
    table = (path / "reports/table1.md").read_text()
    assert "| Pruning |" in table and "WideResNet-28-10" in table and "Accelerating (paper)" in table
    assert "| Quantizing (W8A8) |" in table
    # Every stage's network timed in onnxruntime (report.latency): Table 1's two measured columns
    # filled for the five stages, the final network's figures in the summary, and the integer graph
    # running all its multiply-adds in integer kernels (output quantizers: QLinearConv / QGemm).
    timed = [line.split("|")[9:11] for line in table.splitlines()
             if line.startswith(("| Searching |", "| Improving |", "| Pruning |", "| Accelerating |", "| Quantizing"))]
    assert len(timed) == 5 and all(float(ms) > 0 and float(ips.replace(",", "")) > 0 for ms, ips in timed), timed
    assert summary["ms_batch1"] > 0 and summary["speedup_batch1"] > 0
    assert quant["onnx_integer_mac_share"] == 1.0
    for name in ("prepare", "search", "improve", "prune", "accelerate", "quantize", "summary"):
        metrics = json.loads((path / f"metrics/{name}.json").read_text())
        assert "wall_time_s" in metrics and "images_trained" in metrics, name  # the stage's cost
        # metrics files hold numbers; the rest is run information
        assert all(v is None or isinstance(v, (bool, int, float)) for v in metrics.values()), (name, metrics)
        info = json.loads((path / f"info/{'report' if name == 'summary' else name}.json").read_text())
        assert name == "summary" or {"seed", "device", "torch", "python"} <= set(info), (name, info)
    trained = {n: json.loads((path / f"metrics/{n}.json").read_text())["images_trained"] for n in ALL - {"report"}}
    assert summary["images_trained"] == sum(trained.values()) and trained.pop("prepare") == 0
    assert all(n > 0 for n in trained.values()), trained
    _check_figures(path, env)

    again = run(["dvc", "repro"], path, env)
    assert stages_run(again.stdout) == set()  # cached: nothing re-runs

    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "first run"], path, env)
    _remote_round_trip(path, env)
    _code_changes_mark_only_their_stages(path, env)
    _queued_experiment_runs_only_what_changed(path, env)

    exp = run(["dvc", "exp", "run", "-S", "prune.schedule=[0.4,0.7]"], path, env)
    assert stages_run(exp.stdout) == {"prune", "accelerate", "quantize", "report"}
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], path, env).stdout)
    assert "metrics/search.json" not in diff and "metrics/improve.json" not in diff
    assert diff["metrics/prune.json"]["sparsity"]["new"] == pytest.approx(0.7, abs=1e-3)
    assert diff["metrics/prune.json"]["score"]["diff"] < 0  # sparser: a lower score
    shown = run(["dvc", "metrics", "diff"], path, env).stdout
    assert "metrics/prune.json" in shown and "score" in shown


def _code_changes_mark_only_their_stages(path, env):
    """A change to a file the prune stage imports marks prune (and accelerate, quantize and report,
    which import it too: the report builds every stage's network to time it) changed, not search
    or improve; a change to quantization-aware training marks the quantizing stage and the report
    alone (the earlier stages' caches stay), one to a data source's reader the prepare stage
    alone, one to the code every stage shares all of them."""
    def changed_by(module: str) -> set[str]:
        file = path / module
        original = file.read_text()
        file.write_text(original + "\n# touched\n")
        try:
            return set(json.loads(run(["dvc", "status", "--json"], path, env).stdout))
        finally:
            file.write_text(original)

    assert changed_by("sipa_core/prune/masks.py") == {"prune", "accelerate", "quantize", "report"}
    for module in ("qat.py", "quantizers.py", "record.py"):
        assert changed_by(f"sipa_core/quantize/{module}") == {"quantize", "report"}, module
    assert changed_by("sipa_core/data/sources.py") == {"prepare"}
    assert changed_by("sipa_core/io.py") == ALL
    assert json.loads(run(["dvc", "status", "--json"], path, env).stdout) == {}


def _queued_experiment_runs_only_what_changed(path, env):
    """`dvc exp run --queue` of a report-only change, then `dvc queue start`: the queued run (in a
    copy of the workspace) takes every model stage from the cache and runs the report alone."""
    queued = run(["dvc", "exp", "run", "--queue", "-S", "report.title=Another title"], path, env)
    found = re.search(r"Queued experiment '([^']+)'", queued.stdout + queued.stderr)
    assert found, queued.stdout + queued.stderr
    name = found.group(1)
    try:
        run(["dvc", "queue", "start"], path, env)
        assert "Success" in _wait_for_queue(path, env, name)
        log = run(["dvc", "queue", "logs", name], path, env).stdout
    finally:
        run(["dvc", "queue", "stop", "--kill"], path, env, check=False)
    assert stages_run(log) == {"report"}, log
    shown = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], path, env).stdout))
    assert name in shown and "Another title" in shown
    run(["dvc", "exp", "apply", name], path, env)  # its report, written with the new title
    assert "# Another title" in (path / "reports/table1.md").read_text()
    run(["git", "checkout", "--", "."], path, env)


def _wait_for_queue(path, env, name, timeout=600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], path, env).stdout
        line = next((row for row in status.splitlines() if name in row), "")
        if "Success" in line or "Failed" in line:
            return line
        time.sleep(3)
    raise AssertionError(f"queued experiment {name} did not finish:\n{status}")


def _check_improve_metrics(path):
    """The improve metrics describe the checkpoint it wrote: the counter's score of that
    checkpoint, and its test accuracy re-evaluated (fp16 weights under the 16-bit score)."""
    imp = json.loads((path / PATHS["improve"]["metrics"]).read_text())
    data = load_prepared(path / PATHS["prepare"]["out"])
    model, _ = load_model(path / PATHS["improve"]["out"])
    counted = count(model, (3, *data.image_size), bits=imp["weight_bits"]).summary()
    assert imp["score"] > 0 and imp["score"] == pytest.approx(counted["score"], rel=1e-9)
    fp16 = imp["weight_bits"] == 16
    assert imp["accuracy"] == pytest.approx(evaluate(model, data, "test", fp16=fp16), abs=1e-9)
    assert imp["accuracy_fp32"] == pytest.approx(evaluate(model, data, "test"), abs=1e-9)


def _check_accelerate_metrics(path) -> dict:
    """An exit kept: its position and threshold in the metrics and the checkpoint, and the test
    exit ratio that the checkpoint's exit gives at that threshold (a sample leaves when its
    maximum softmax is above it). No exit: the main network passes through, nothing set."""
    acc = json.loads((path / PATHS["accelerate"]["metrics"]).read_text())
    checkpoint = path / PATHS["accelerate"]["out"]
    if acc["passthrough"]:
        assert acc["threshold"] is None and acc["exit_position"] is None and acc["exit_ratio"] == 0.0, acc
        assert ExitRecord.of(read_checkpoint(checkpoint)) is None
        return acc
    net, record = load_early_exit(checkpoint)
    assert acc["exit_position"] == record.config.position is not None and acc["threshold"] == record.threshold
    assert 0 <= acc["threshold"] <= 1 and acc["val_exit_ratio"] > 0
    data = load_prepared(path / PATHS["prepare"]["out"])
    x, _ = data.split("test")
    scored = sixteen_bit(net) if acc["weight_bits"] == 16 else net
    with torch.no_grad():
        confidence = F.softmax(scored.eval()(normalized(x, data.mean, data.std)).float(), 1).amax(1)
    ratio = float((confidence > acc["threshold"]).float().mean())
    assert acc["exit_ratio"] > 0 and acc["exit_ratio"] == pytest.approx(ratio, abs=1e-6), (acc["exit_ratio"], ratio)
    return acc


def _remote_round_trip(path, env):
    """A local-directory remote: `dvc push` here, `dvc pull` in a fresh clone, and that clone is
    up to date (its `dvc repro` runs nothing), with the checkpoints present."""
    remote = path.parent / "remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], path, env)
    run(["git", "add", ".dvc/config"], path, env)
    run(["git", "commit", "-qm", "remote"], path, env)
    run(["dvc", "push"], path, env)
    clone = path.parent / "clone"
    run(["git", "clone", "-q", str(path), str(clone)], path.parent, env)
    assert not (clone / "models/accelerate.pt").exists()
    run(["dvc", "pull"], clone, env)
    assert (clone / "models/accelerate.pt").read_bytes() == (path / "models/accelerate.pt").read_bytes()
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env).stdout
    assert stages_run(run(["dvc", "repro"], clone, env).stdout) == set()


def _check_figures(path, env):
    """`dvc plots show`: each top-level figure once (no raw copies of its CSVs), with data and a title."""
    shown = json.loads(run(["dvc", "plots", "show", "--json"], path, env).stdout)
    assert not shown.get("errors"), shown.get("errors")
    plots = yaml.safe_load((path / "dvc.yaml").read_text())["plots"]
    assert sorted(shown["data"]) == sorted(next(iter(p)) for p in plots)
    for plot in plots:
        name, spec = next(iter(plot.items()))
        files = [re.sub(r"\$\{paths\.(\w+)\.(\w+)\}", lambda m: PATHS[m[1]][m[2]], f) for f in spec["y"]]
        has_rows = any(len((path / f).read_text().splitlines()) > 1 for f in files)
        figures = shown["data"][name]
        # Once, titled, with data; none only where its tables are empty (no exit kept: no risk-coverage).
        assert len(figures) == (1 if has_rows else 0), name
        assert not figures or (figures[0]["content"]["data"]["values"] and figures[0]["content"].get("title")), name


def test_bad_params_fail_the_stage_cleanly(project):
    path, env = project
    set_params(path, source="imagefolder", root="nowhere", val_sise=3)
    p = run(["dvc", "repro"], path, env, check=False)
    assert p.returncode != 0
    assert "params.yaml: prepare.val_sise: unknown key (did you mean prepare.val_size?)" in p.stderr + p.stdout
    assert not (path / "data/prepared/dataset.pt").exists()
