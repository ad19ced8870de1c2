"""The cost of a run: `sipa plan` before it (trainings, images, estimated time), and the
training images every stage records after it."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import tiny_data, tiny_model
from sipa_core.plan import plan
from sipa_core.resume import keep, load_kept
from sipa_core.runtime import provenance, training_cost
from sipa_core.train import default_recipe, fit

ROOT = Path(__file__).resolve().parents[1]


def _plan(*args):
    out = subprocess.run([sys.executable, "-m", "sipa_core.cli", "plan", *args], capture_output=True, text=True,
                         cwd=ROOT)
    return out


@pytest.mark.slow  # CLI subprocesses
def test_plan_of_the_paper_profile_counts_its_trainings():
    out = _plan("profiles/paper.yaml", "--throughput", "18600", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    # CIFAR-100: 50,000 training images, 5,000 held out for validation; the network sees 63 px.
    assert plan["data"] == {"classes": 100, "train": 45_000, "val": 5_000, "test": 10_000}
    rows = {(r["stage"], r["training"].split(" ")[0]): r for r in plan["trainings"]}
    assert rows[("improve", "final")]["images"] == 1200 * 45_000  # compare_base: false in the paper profile
    prune = rows[("prune", "11")]
    assert (prune["runs"], prune["epochs"], prune["images"]) == (11, 600, 11 * 600 * 45_000)
    assert rows[("accelerate", "exits")]["epochs"] == 800 and all(r["resolution"] == 63 for r in plan["trainings"])
    assert plan["total_images"] == sum(r["images"] for r in plan["trainings"])
    assert plan["estimated_seconds"] == pytest.approx(plan["total_images"] / 18600)
    text = _plan("profiles/paper.yaml", "--throughput", "18600").stdout
    assert "| prune | 11 rounds | 11 | 600 | 45,000 | 297,000,000 | 63 px | 4.4 h |" in text


@pytest.mark.slow  # CLI subprocesses
def test_plan_of_the_quick_profile_and_bad_input():
    plan = json.loads(_plan("params.yaml", "--json").stdout)
    assert plan["data"] == {"classes": 10, "train": 2_000, "val": 500, "test": 2_000}
    assert plan["estimated_seconds"] is None  # no throughput given or measured
    bad = _plan("params.yaml", "--throughput", "0")
    assert bad.returncode == 2 and "--throughput must be a positive number" in bad.stderr


def test_every_training_epoch_is_counted_for_the_stage_metrics():
    started = time.time()
    data = tiny_data(n_train=64)
    fit(tiny_model(), data, default_recipe(epochs=2, batch_size=16), val_split=None, progress=False)
    cost = provenance(seed=0, device="cpu", started=started)
    assert (cost["images_trained"], cost["train_epochs"]) == (2 * 64, 2)
    assert provenance(seed=0, device="cpu", started=time.time())["images_trained"] == 0


def test_a_resumed_or_kept_result_costs_what_its_training_did(tmp_path):
    """The cost is the training the result took, whichever process ran it: a finished run
    resumed (it trains nothing more) and a kept result read in place of its work count it."""
    data, recipe = tiny_data(n_train=64), default_recipe(epochs=2, batch_size=16)
    started = time.time()
    fit(tiny_model(), data, recipe, state_path=tmp_path / "state.pt", val_split=None, progress=False)
    keep(tmp_path / "result.json", {"val_acc": 0.5}, since=started)
    again = time.time()
    fit(tiny_model(), data, recipe, state_path=tmp_path / "state.pt", val_split=None, progress=False)
    assert training_cost(again) == {"images_trained": 2 * 64, "train_epochs": 2}
    later = time.time()
    assert load_kept(tmp_path / "result.json")["val_acc"] == 0.5
    assert training_cost(later) == {"images_trained": 2 * 64, "train_epochs": 2}
    latest = time.time()
    load_kept(tmp_path / "result.json", counted=False)  # read again after it was counted
    assert training_cost(latest)["images_trained"] == 0


def test_gradual_pruning_and_a_width_schedule_are_planned_whole(tmp_path):
    """Gradual pruning trains its pruning epochs then its fine-tune epochs in one run; a width
    schedule trains each step above the final widths before them (both once left out of the plan)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prune"].update(method="gradual", schedule=[0.8], epochs=5, gradual_finetune_epochs=7)
    params["quantize"].update(weight_bits=4, act_bits=4, schedule=[8, 6], schedule_epochs=3, epochs=2,
                              exit_epochs=1, compare_widths=[])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    sizes, rows = plan(str(tmp_path / "p.yaml"))
    by_stage = {r["stage"]: r for r in rows}
    assert (by_stage["prune"]["runs"], by_stage["prune"]["epochs"]) == (1, 12)
    assert (by_stage["quantize"]["runs"], by_stage["quantize"]["epochs"]) == (1, 2 + 1 + 2 * 3)
    assert by_stage["prune"]["images"] == 12 * sizes["train"]
