"""Each profile as a user runs it, in a temporary git repository: `dvc exp run` to the end.
(A file of its own so that the test suite's two workers share the end-to-end runs; code changes
and a queued experiment are checked on the whole pipeline's run in tests/test_pipeline.py.)"""

import json
import shutil

import pytest

from test_pipeline import ALL, ROOT, make_project, run, stages_run

pytestmark = pytest.mark.slow  # dvc end to end, in a temporary repository


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path)


# Every epoch count 1, a few CIFAR-10 images per class, the report's timing brief (20 single
# images, one pass in batches): the profile's own settings otherwise.
BRIEF_LATENCY = ["++report.latency.singles=20", "++report.latency.rounds=1"]  # the report fills in the rest
# (The paper profile runs end to end under dvc in tests/test_gpu_check.py: benchmarks/toy_pipeline.py.)
PROFILE_OVERRIDES = {
    "cpu": ["prepare.val_size=40", "prepare.images_per_class=12", "prepare.test_images_per_class=4",
            "search.recipe.epochs=1", "improve.final_epochs=1", "prune.epochs=1", "prune.gradual_finetune_epochs=1",
            "accelerate.epochs=1", "quantize.epochs=1", "quantize.exit_epochs=1", *BRIEF_LATENCY],
    "quick": ["prepare.val_size=40", "prepare.images_per_class=12",  # the shipped CIFAR-10 subset
              "prepare.test_images_per_class=4", "search.max_evals=2", "search.recipe.epochs=1",
              "improve.trial_epochs=1", "improve.final_epochs=1", "prune.epochs=1", "accelerate.epochs=1",
              "quantize.epochs=1", "quantize.exit_epochs=1", *BRIEF_LATENCY],
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
