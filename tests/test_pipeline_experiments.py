"""The pipeline as a user experiments with it, in a temporary git repository: a code change and a
queued experiment re-run only what changed; each profile runs to the end under `dvc exp run`.
(A file of its own so that the test suite's two workers share the end-to-end runs.)"""

import json
import re
import shutil
import time

import pytest

from test_pipeline import (ALL, ROOT, TINY_ACCELERATE, TINY_IMPROVE, TINY_PRUNE, TINY_QUANTIZE, TINY_SEARCH,
                           make_project, run, set_params, stages_run)

pytestmark = pytest.mark.slow  # dvc end to end, in a temporary repository


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path)


def _tiny_pipeline(path, cifar10_jpeg):
    set_params(path, source="imagefolder", root=str(cifar10_jpeg), val_size=50, images_per_class=20,
               test_images_per_class=10)
    set_params(path, "search", **TINY_SEARCH)
    set_params(path, "improve", **TINY_IMPROVE)
    set_params(path, "prune", **{**TINY_PRUNE, "schedule": [0.3, 0.5]})
    set_params(path, "accelerate", **TINY_ACCELERATE)
    # one width: the comparison widths run end to end in tests/test_pipeline.py
    set_params(path, "quantize", **{**TINY_QUANTIZE, "compare_widths": []})


def _wait_for_queue(path, env, name, timeout=900) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], path, env).stdout
        line = next((row for row in status.splitlines() if name in row), "")
        if "Success" in line or "Failed" in line:
            return line
        time.sleep(3)
    raise AssertionError(f"queued experiment {name} did not finish:\n{status}")


def test_code_changes_and_queued_experiments_rerun_only_what_changed(project, cifar10_jpeg):
    """A change to a file the prune stage imports marks prune (and accelerate, quantize and report,
    which import it too: the report builds every stage's network to time it) changed, not search
    or improve; a change to quantization-aware training marks the quantizing stage and the report
    alone (the earlier stages' caches stay), and one to a data source's reader
    the prepare stage alone; a queued prune-only experiment
    runs prune, accelerate, quantize and report only: search and improve come from the cache."""
    path, env = project
    _tiny_pipeline(path, cifar10_jpeg)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "init"], path, env)
    run(["dvc", "repro"], path, env)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "first run"], path, env)

    masks = path / "sipa_core/prune/masks.py"
    original = masks.read_text()
    masks.write_text(original + "\n# touched\n")
    changed = set(json.loads(run(["dvc", "status", "--json"], path, env).stdout))
    assert changed == {"prune", "accelerate", "quantize", "report"}, changed
    masks.write_text(original)
    for module in ("qat.py", "quantizers.py", "record.py"):
        qat = path / "sipa_core/quantize" / module
        qat.write_text(qat.read_text() + "\n# touched\n")
        changed = set(json.loads(run(["dvc", "status", "--json"], path, env).stdout))
        assert changed == {"quantize", "report"}, (module, changed)
        run(["git", "checkout", "--", f"sipa_core/quantize/{module}"], path, env)
    sources = path / "sipa_core/data/sources.py"
    sources.write_text(sources.read_text() + "\n# touched\n")
    assert set(json.loads(run(["dvc", "status", "--json"], path, env).stdout)) == {"prepare"}
    run(["git", "checkout", "--", "sipa_core/data/sources.py"], path, env)
    (path / "sipa_core/io.py").write_text((path / "sipa_core/io.py").read_text() + "\n# touched\n")
    changed = set(json.loads(run(["dvc", "status", "--json"], path, env).stdout))
    assert changed == ALL, changed
    run(["git", "checkout", "--", "sipa_core/io.py"], path, env)
    assert json.loads(run(["dvc", "status", "--json"], path, env).stdout) == {}

    queued = run(["dvc", "exp", "run", "--queue", "-S", "prune.schedule=[0.5]"], path, env)
    found = re.search(r"Queued experiment '([^']+)'", queued.stdout + queued.stderr)
    assert found, queued.stdout + queued.stderr
    name = found.group(1)
    try:
        run(["dvc", "queue", "start"], path, env)
        assert "Success" in _wait_for_queue(path, env, name)
        log = run(["dvc", "queue", "logs", name], path, env).stdout
    finally:
        run(["dvc", "queue", "stop", "--kill"], path, env, check=False)
    assert stages_run(log) == {"prune", "accelerate", "quantize", "report"}, log
    shown = json.loads(run(["dvc", "exp", "show", "--json"], path, env).stdout)
    assert name in json.dumps(shown)


# Every epoch count 1 and a few CIFAR-10 images per class: the profile's own settings otherwise.
# (The paper profile runs end to end under dvc in tests/test_gpu_check.py: benchmarks/toy_pipeline.py.)
PROFILE_OVERRIDES = {
    "cpu": ["prepare.val_size=40", "prepare.images_per_class=12", "prepare.test_images_per_class=4",
            "search.recipe.epochs=1", "improve.final_epochs=1", "prune.epochs=1", "prune.gradual_finetune_epochs=1",
            "accelerate.epochs=1", "quantize.epochs=1", "quantize.exit_epochs=1"],
    "quick": ["prepare.val_size=40", "prepare.images_per_class=12",  # the shipped CIFAR-10 subset
              "prepare.test_images_per_class=4", "search.max_evals=2", "search.recipe.epochs=1",
              "improve.trial_epochs=1", "improve.final_epochs=1", "prune.epochs=1", "accelerate.epochs=1",
              "quantize.epochs=1", "quantize.exit_epochs=1"],
}


@pytest.mark.parametrize("profile", ["cpu", "quick"])
def test_each_profile_runs_to_the_end_under_dvc(project, cifar10_jpeg, profile):
    """`dvc exp run` of the profile as a user would run it (tiny overrides only): every declared
    output is written whatever the options, and the report's summary comes out."""
    path, env = project
    if profile != "quick":
        shutil.copy(ROOT / "profiles" / f"{profile}.yaml", path / "params.yaml")
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "init"], path, env)
    root = [f"prepare.root={cifar10_jpeg}"] if profile != "quick" else []
    sets = [a for s in PROFILE_OVERRIDES[profile] + root for a in ("-S", s)]
    out = run(["dvc", "exp", "run", *sets], path, env)
    assert stages_run(out.stdout) == ALL
    summary = json.loads((path / "metrics/summary.json").read_text())
    assert json.loads((path / "info/report.json").read_text())["final_stage"] == "quantize"
    assert summary["score"] > 0 and (path / "reports/claims.md").is_file()
