"""A training stage on 2 CPU processes (gloo) through `distributed.processes`, under `dvc repro`:
it ends with the network and metrics of one process with ghost BatchNorm of batch_size / 2; a
process killed mid-epoch stops the stage cleanly and the next run resumes to the same result."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY_BLOCKS, save_prepared, tiny_data
from sipa_core.models import efficientnet_spec

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)
SLOW = pytest.mark.slow  # dvc and torchrun subprocesses, two training processes each

RECIPE = {"batch_size": 16, "lr": 0.05, "weight_decay": 0.0, "schedule": "constant", "mixup_alpha": 0.5}


def workspace(work: Path, processes: int, ghost_batch: int = 0) -> Path:
    """The pipeline's code and dvc.yaml, the improving stage's inputs (8 classes: not every run
    reaches 100%), and a params file training on ``processes`` processes."""
    work.mkdir(parents=True)
    for part in ("sipa_core", "stages", "networks"):  # networks/: a dependency of every network-building stage
        shutil.copytree(ROOT / part, work / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    (work / "data/prepared").mkdir(parents=True)
    (work / "models/search").mkdir(parents=True)
    save_prepared(tiny_data(n_train=96, n_val=32, n_test=64, num_classes=8), work / "data/prepared/dataset.pt")
    spec = efficientnet_spec(TINY_BLOCKS, image_size=16, num_classes=8, head=32, dropout=0.0, drop_connect=0.0)
    (work / "models/search/arch.yaml").write_text(yaml.safe_dump(spec))
    (work / "models/search/model.pt").write_bytes(b"the search stage's network: not read by improve here")
    base = {**RECIPE, **({"ghost_batch": ghost_batch} if ghost_batch else {})}
    params = {"distributed": {"processes": processes},
              "improve": {"greedy": False, "adopt": [], "final_epochs": 3, "compare_base": False, "base": base}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


def run(cmd, work: Path, fault: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "SIPA_FAULT"}
    env["PATH"] = BIN + os.pathsep + env["PATH"]  # `python` in dvc.yaml: this interpreter
    if fault:
        env["SIPA_FAULT"] = fault
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)


def metrics(work: Path) -> dict:
    m = json.loads((work / "metrics/improve.json").read_text())
    m.pop("wall_time_s")  # this process's time, not the result
    return m


def same_network(a: Path, b: Path, atol: float = 1e-5):
    ma = torch.load(a / "models/improve.pt", weights_only=True)["model"]
    mb = torch.load(b / "models/improve.pt", weights_only=True)["model"]
    for key, value in ma.items():
        if not key.endswith("num_batches_tracked"):  # counts updates, not used with a momentum
            assert torch.allclose(value.float(), mb[key].float(), atol=atol, rtol=1e-4), key


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """`dvc repro` of the improving stage with distributed.processes: 2."""
    work = workspace(tmp_path_factory.mktemp("ddp") / "w", processes=2)
    assert run([BIN + "/dvc", "init", "--no-scm", "-q"], work).returncode == 0
    p = run([BIN + "/dvc", "repro", "--single-item", "improve"], work)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return work


@SLOW
def test_dvc_repro_on_two_processes_equals_one_with_ghost_batchnorm(two_processes, tmp_path):
    assert json.loads((two_processes / "info/improve.json").read_text())["processes"] == 2
    one = workspace(tmp_path / "one", processes=1, ghost_batch=RECIPE["batch_size"] // 2)
    p = run([sys.executable, "stages/improve.py"], one)
    assert p.returncode == 0, p.stderr[-3000:]
    assert metrics(two_processes) == metrics(one)
    same_network(two_processes, one)  # running statistics included


@SLOW
def test_the_process_count_is_a_param_of_the_training_stages_only(two_processes):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    with_it = sorted(name for name, s in stages.items() if "distributed" in [str(p) for p in s.get("params", [])])
    assert with_it == ["accelerate", "improve", "prune", "quantize", "search"]  # not prepare, not report
    assert run([BIN + "/dvc", "status", "--json", "improve"], two_processes).stdout.strip() in ("{}", "")
    params = yaml.safe_load((two_processes / "params.yaml").read_text())
    params["distributed"]["processes"] = 1  # BatchNorm statistics per process: the result changes
    (two_processes / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        status = json.loads(run([BIN + "/dvc", "status", "--json", "improve"], two_processes).stdout)
        assert status["improve"][0]["changed deps"] == {"params.yaml": {"distributed": "modified"}}
    finally:
        params["distributed"]["processes"] = 2
        (two_processes / "params.yaml").write_text(yaml.safe_dump(params))


@SLOW
def test_a_killed_process_stops_the_stage_and_the_rerun_resumes(two_processes, tmp_path):
    work = workspace(tmp_path / "w", processes=2)
    killed = run([sys.executable, "stages/improve.py"], work, fault="step:8@1")  # rank 1, epoch 2 of 3
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert "improve: training process 1 of 2 stopped (signal SIGKILL)" in killed.stderr
    assert not (work / "metrics/improve.json").exists()
    again = run([sys.executable, "stages/improve.py"], work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after epoch 1/3" in again.stderr
    assert metrics(work) == metrics(two_processes)
    same_network(work, two_processes, atol=0.0)


@pytest.mark.parametrize("env, says", [
    ({"SIPA_NNODES": "2"}, "environment SIPA_MASTER_ADDR: several nodes"),
    ({"SIPA_NNODES": "2", "SIPA_MASTER_ADDR": "10.0.0.1"}, "distributed.processes: 3 processes cannot be split"),
    ({"SIPA_NNODES": "x"}, "environment SIPA_NNODES: expected an integer >= 1, got 'x'"),
    ({"SIPA_NNODES": "2", "SIPA_NODE_RANK": "2", "SIPA_MASTER_ADDR": "h"}, "SIPA_NODE_RANK: 2 is not below"),
    ({"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "by-hand"}, "distributed.processes: 3, but 2 processes"),
])
def test_bad_process_settings_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, env, says):
    """Checked in the stage script before any process starts (here in this process)."""
    from sipa_core.improve.stage import STAGE  # noqa: PLC0415
    from sipa_core.stage_runner import stage_main  # noqa: PLC0415

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"distributed": {"processes": 3}}))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stop:
        stage_main(STAGE, ["--params", str(params)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and says in err, err
