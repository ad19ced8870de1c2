"""Kill anywhere and lose nothing: each model stage is SIGKILLed at several
points (SIPA_FAULT, sipa_core/faults.py), run again, and must resume (work
already done is not redone) and end with the checkpoint and metrics of an
uninterrupted run (deterministic CPU mode)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY_BLOCKS, save_prepared, tiny_arch_yaml, tiny_data
from sipa_core.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
KILLED = -signal.SIGKILL
pytestmark = pytest.mark.slow  # fault injection: stage subprocesses killed and run again


def stage(name, work: Path, fault: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "SIPA_FAULT"}
    if fault:
        env["SIPA_FAULT"] = fault
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), "--params", "params.yaml"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)


def setup(work: Path) -> Path:
    """A tiny project: data, an architecture, and every model stage's section."""
    work.mkdir(parents=True, exist_ok=True)
    save_prepared(tiny_data(n_train=96, n_val=32, n_test=32), work / "data.pt")
    tiny_arch_yaml(work / "arch.yaml")
    recipe = {"batch_size": 16, "lr": 0.05, "weight_decay": 0.0}
    params = {
        "search": {"method": "hyperopt", "template": TINY_BLOCKS, "head": 32, "max_evals": 3, "startup_trials": 2,
                   "steps": ["blocks"],
                   "space": {"kernel": [3, 5], "expand": [2, 4], "repeats": [1, 2], "channels": [0.5, 1.0],
                             "r": [1.0, 1.0], "width": [1.0, 1.0], "depth": [1.0, 1.0]},
                   "budget": 1.0, "target": 1.0, "recipe": {**recipe, "epochs": 2}, "data": "data.pt"},
        "improve": {"arch": "arch.yaml", "data": "data.pt", "candidates": ["larger_lr"], "trial_epochs": 2,
                    "final_epochs": 3, "compare_base": False, "options": {"larger_lr": 0.1},
                    "base": {**recipe, "lr": 0.01, "schedule": "constant"}},
        "prune": {"model": "models/improve.pt", "data": "data.pt", "schedule": [0.3, 0.5, 0.7], "epochs": 2,
                  "recipe": {"lr": 0.02}, "max_drop": None},
        "accelerate": {"model": "models/prune.pt", "data": "data.pt", "positions": [0], "epochs": 3,
                       "recipe": {"lr": 0.05}, "max_drop": 0.5, "thresholds": [0.3, 0.5, 0.7]},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


def same_metrics(a: Path, b: Path):
    ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
    for m in (ma, mb):  # the wall time differs; the training the result cost does not
        m.pop("wall_time_s")
    assert ma == mb


def same_checkpoint(a: Path, b: Path):
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Every model stage run once without interruption, in order."""
    work = setup(tmp_path_factory.mktemp("reference"))
    for name in ("search", "improve", "prune", "accelerate"):
        p = stage(name, work)
        assert p.returncode == 0, p.stderr
    return work


def clone_inputs(reference: Path, work: Path, *files):
    setup(work)
    for f in files:
        (work / f).parent.mkdir(parents=True, exist_ok=True)
        (work / f).write_bytes((reference / f).read_bytes())


@pytest.mark.parametrize("fault, resumed", [
    ("trial:1", "finished trial(s) kept"),  # between search trials
    ("step:9", "resuming after epoch 1"),   # mid-epoch: the first trial's second epoch
])
def test_search_resumes(reference, tmp_path, fault, resumed):
    work = setup(tmp_path)
    killed = stage("search", work, fault)
    assert killed.returncode == KILLED
    again = stage("search", work)
    assert again.returncode == 0, again.stderr
    assert resumed in again.stdout + again.stderr
    same_metrics(work / "metrics/search.json", reference / "metrics/search.json")
    same_checkpoint(work / "models/search/model.pt", reference / "models/search/model.pt")


@pytest.mark.parametrize("fault, resumed", [
    ("step:3", None),                      # mid-epoch: the epoch starts over from the last state
    ("epoch:4", "resuming after epoch 2"), # between epochs of the first adopted trial / final training
    ("write:5", "resuming after epoch"),   # during a checkpoint write (temporary file, not yet renamed)
])
def test_improve_resumes(reference, tmp_path, fault, resumed):
    work = setup(tmp_path)
    killed = stage("improve", work, fault)
    assert killed.returncode == KILLED
    assert not list(work.rglob(".*.tmp")) or fault.startswith("write")  # only a killed write leaves a temp file
    again = stage("improve", work)
    assert again.returncode == 0, again.stderr
    if resumed:
        assert resumed in again.stderr, again.stderr
    same_metrics(work / "metrics/improve.json", reference / "metrics/improve.json")
    same_checkpoint(work / "models/improve.pt", reference / "models/improve.pt")


@pytest.mark.parametrize("name, given, out, fault, resumed", [
    ("prune", "models/improve.pt", "models/prune.pt", "round:2", "prune round 2: kept"),  # between rounds
    ("prune", "models/improve.pt", "models/prune.pt", "step:15", "prune round 1: kept"),  # mid-round 2
    ("accelerate", "models/prune.pt", "models/accelerate.pt", "epoch:2", "resuming after epoch 2"),  # mid exit training
    ("accelerate", "models/prune.pt", "models/accelerate.pt", "exit:1", "kept from"),  # before the comparison exit
    # outputs written, metrics not yet
    ("prune", "models/improve.pt", "models/prune.pt", "publish:1", "prune round 3: kept"),
])
def test_prune_and_accelerate_resume(reference, tmp_path, name, given, out, fault, resumed):
    clone_inputs(reference, tmp_path, given, f"metrics/{name}.json")  # + an earlier run's metrics
    killed = stage(name, tmp_path, fault)
    assert killed.returncode == KILLED
    if fault.startswith("publish"):  # outputs in place, the earlier metrics removed: never a checkpoint
        assert (tmp_path / out).is_file()  # beside metrics that describe another one
        assert not (tmp_path / f"metrics/{name}.json").exists()
    else:  # killed while working: the earlier outputs and metrics are untouched
        assert (tmp_path / f"metrics/{name}.json").read_text() == (reference / f"metrics/{name}.json").read_text()
    again = stage(name, tmp_path)
    assert again.returncode == 0, again.stderr
    assert resumed in again.stderr
    same_metrics(tmp_path / f"metrics/{name}.json", reference / f"metrics/{name}.json")
    same_checkpoint(tmp_path / out, reference / out)


def test_killed_write_leaves_the_old_file_whole(tmp_path):
    """A kill between writing the temporary file and the rename leaves the
    previous version in place, readable."""
    target = tmp_path / "m.json"
    atomic_write_json(target, {"version": 1})
    code = ("import sys; from sipa_core.io import atomic_write_json; "
            f"atomic_write_json({str(target)!r}, {{'version': 2}})")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SIPA_FAULT": "write:1"}, cwd=ROOT)
    assert p.returncode == KILLED
    assert json.loads(target.read_text()) == {"version": 1}
    leftovers = list(tmp_path.glob(".m.json.*.tmp"))
    assert len(leftovers) == 1  # the unfinished write, never read by anyone
