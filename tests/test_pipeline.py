"""The DVC pipeline as a user drives it, in a temporary git repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, cwd, env, check=True):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def project(tmp_path):
    """A copy of the pipeline (code, dvc.yaml, params.yaml) in a fresh git + DVC repo."""
    dst = tmp_path / "proj"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("sipa_core", "stages"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, dst / name)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run(["git", "init", "-q", "-b", "main"], dst, env)
    run(["dvc", "init", "-q"], dst, env)
    return dst, env


def set_params(path: Path, section="prepare", **values):
    params = yaml.safe_load((path / "params.yaml").read_text())
    params[section].update(values)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


TINY_SEARCH = dict(method="hyperopt", steps=["blocks"], max_evals=2, trial_images_per_class=10,
                   recipe={"epochs": 1, "batch_size": 32})
TINY_IMPROVE = dict(candidates=["larger_lr"], trial_epochs=1, final_epochs=1,
                    base={"batch_size": 32, "lr": 0.01, "schedule": "constant"})


def test_prepare_stage_under_dvc(project, cifar10_jpeg):
    path, env = project
    set_params(path, source="imagefolder", root=str(cifar10_jpeg), val_size=50, images_per_class=30,
               test_images_per_class=10)
    set_params(path, "search", **TINY_SEARCH)
    set_params(path, "improve", **TINY_IMPROVE)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "init"], path, env)

    first = run(["dvc", "repro"], path, env)
    assert "Running stage 'prepare'" in first.stdout
    m = json.loads((path / "metrics/prepare.json").read_text())
    assert (m["train_images"], m["val_images"], m["test_images"], m["num_classes"]) == (250, 50, 100, 10)
    assert (path / "data/prepared/dataset.pt").is_file()
    assert "Running stage 'search'" in first.stdout and "Running stage 'improve'" in first.stdout
    assert json.loads((path / "metrics/search.json").read_text())["trials"] == 2
    assert (path / "models/search/arch.yaml").is_file() and (path / "plots/search_trials.csv").is_file()
    imp = json.loads((path / "metrics/improve.json").read_text())
    assert 0 <= imp["accuracy"] <= 1 and imp["score"] > 0
    assert (path / "models/improve.pt").is_file() and (path / "plots/improve_techniques.csv").is_file()

    again = run(["dvc", "repro"], path, env)
    assert "Running stage" not in again.stdout  # cached: nothing re-runs

    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "first run"], path, env)
    exp = run(["dvc", "exp", "run", "-S", "improve.final_epochs=2"], path, env)
    assert "Running stage 'improve'" in exp.stdout
    assert "Running stage 'prepare'" not in exp.stdout and "Running stage 'search'" not in exp.stdout
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], path, env).stdout)
    assert "metrics/improve.json" in diff and "metrics/prepare.json" not in diff
    assert "metrics/search.json" not in diff

    run(["git", "checkout", "--", "params.yaml"], path, env)
    exp = run(["dvc", "exp", "run", "-S", "prepare.val_size=100"], path, env)
    for name in ("prepare", "search", "improve"):
        assert f"Running stage '{name}'" in exp.stdout
    assert json.loads((path / "metrics/prepare.json").read_text())["val_images"] == 100
    diff = run(["dvc", "metrics", "diff", "--json"], path, env)
    assert json.loads(diff.stdout)["metrics/prepare.json"]["val_images"] == {"old": 50, "new": 100, "diff": 50}


def test_bad_params_fail_the_stage_cleanly(project):
    path, env = project
    set_params(path, source="imagefolder", root="nowhere", val_sise=3)
    p = run(["dvc", "repro"], path, env, check=False)
    assert p.returncode != 0
    assert "params.yaml: prepare.val_sise: unknown key (did you mean prepare.val_size?)" in p.stderr + p.stdout
    assert not (path / "data/prepared/dataset.pt").exists()
