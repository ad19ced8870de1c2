"""The Improving stage: technique registry, greedy selection, the stage itself."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sipa_core.improve.runs as improve_runs
import sipa_core.train as train_mod
from helpers import tiny_model, save_prepared, tiny_arch_yaml, tiny_data
from sipa_core.improve import (CATEGORIES, TECHNIQUES, apply_techniques, greedy_select, improve, ordered,
                               read_config)
from sipa_core.checkpoint import load_model, save_model
from sipa_core.params import check_section
from sipa_core.report import claims_markdown
from sipa_core.improve import OPTIONS_SCHEMA
from sipa_core.train import default_recipe, fit

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = check_section({}, OPTIONS_SCHEMA, file="t", section="improve.options")


def test_registry_has_the_papers_techniques_in_four_categories():
    for name in ["autoaugment", "cosine", "larger_lr", "no_bias_decay", "no_bn_decay", "ghost_bn", "mixup",
                 "label_smoothing", "swish", "no_validation", "stabilize"]:
        assert name in TECHNIQUES
    assert {t.category for t in TECHNIQUES.values()} == set(CATEGORIES)
    r = apply_techniques(default_recipe(), ["larger_lr", "ghost_bn", "label_smoothing", "mixup", "stabilize"], OPTIONS)
    assert (r["lr"], r["ghost_batch"], r["label_smoothing"], r["mixup_alpha"]) == (0.13, 32, 0.3, 1.0)
    assert r["stabilize_epochs"] == 1
    assert ordered(["mixup", "autoaugment", "cosine", "swish"], "category") == ["cosine", "swish", "mixup",
                                                                               "autoaugment"]
    assert ordered(["mixup", "cosine"], "listed") == ["mixup", "cosine"]


def test_greedy_adopts_what_helps_and_rejects_what_hurts():
    """A controlled case: label smoothing helps, mixup hurts, cosine changes nothing."""
    seen = []

    def trial(recipe):
        seen.append(recipe)
        acc = 0.5 + (0.1 if recipe["label_smoothing"] > 0 else 0) - (0.1 if recipe["mixup_alpha"] > 0 else 0)
        return acc

    base = default_recipe(schedule="constant")
    adopted, decisions, base_acc = greedy_select(["label_smoothing", "mixup", "cosine"], base, OPTIONS, 0.0, trial)
    assert adopted == ["label_smoothing"] and base_acc == 0.5
    assert [(d.technique, d.adopted) for d in decisions] == [("label_smoothing", True), ("mixup", False),
                                                             ("cosine", False)]
    assert decisions[1].acc_without == pytest.approx(0.6) and decisions[1].acc_with == pytest.approx(0.5)
    # Each later trial builds on what was adopted so far.
    assert seen[2]["label_smoothing"] == 0.3 and seen[3]["label_smoothing"] == 0.3 and seen[3]["mixup_alpha"] == 0


def test_threshold_and_divergence():
    accs = iter([0.5, 0.52, float("nan")])
    adopted, decisions, _ = greedy_select(["cosine", "larger_lr"], default_recipe(), OPTIONS, 0.05,
                                          lambda r: next(accs))
    assert adopted == [] and not any(d.adopted for d in decisions)
    assert math.isnan(decisions[1].acc_with)


def write_params(tmp_path, **improve_cfg):
    save_prepared(tiny_data(n_train=96, n_val=32, n_test=32), tmp_path / "data.pt")
    tiny_arch_yaml(tmp_path / "arch.yaml")
    cfg = {"arch": str(tmp_path / "arch.yaml"), "data": str(tmp_path / "data.pt"),
           "candidates": ["larger_lr", "cosine"],
           "base": {"lr": 0.0001, "schedule": "constant", "batch_size": 16, "weight_decay": 0.0},
           "options": {"larger_lr": 0.1}, "trial_epochs": 3, "final_epochs": 3,
           "out": str(tmp_path / "models/improve.pt"), "state": str(tmp_path / "state"),
           "metrics": str(tmp_path / "metrics/improve.json"), "info": str(tmp_path / "info/improve.json"),
           "table": str(tmp_path / "plots/t.csv"),
           "live": str(tmp_path / "live/improve"), "compare": str(tmp_path / "plots/compare.csv"),
           "search_model": str(tmp_path / "models/search/model.pt")}
    cfg.update(improve_cfg)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"improve": cfg}))
    return tmp_path / "params.yaml"


def test_stage_selects_trains_and_resumes(tmp_path, monkeypatch):
    params = write_params(tmp_path)
    calls = []
    real_fit = train_mod.fit

    def counting_fit(*args, **kwargs):
        res = real_fit(*args, **kwargs)
        calls.append(res.epochs - res.resumed_from)
        return res

    monkeypatch.setattr(improve_runs, "fit", counting_fit)  # where the stage looks it up
    m = improve(read_config(params), params_file=str(params), progress=False)
    assert m["adopted"].split(",")[0] == "larger_lr"  # lr 1e-4 learns nothing in 3 epochs; 0.1 does
    assert m["accuracy"] > m["base_accuracy"]
    for key in ("params_score", "ops_score", "score", "accuracy", "val_accuracy", "seed", "device", "torch"):
        assert key in m
    table = (tmp_path / "plots/t.csv").read_text().splitlines()
    assert table[0] == "technique,category,acc_without,acc_with,gain,adopted"
    assert table[2].startswith("larger_lr,general,") and table[2].endswith(",yes")
    assert (tmp_path / "models/improve.pt").is_file()
    assert (tmp_path / "live/improve/plots/metrics/train_loss.tsv").is_file()
    assert sum(calls) == 3 * 3 + 3 + 3  # three trials, the final run, the base recipe's final run

    calls.clear()
    again = improve(read_config(params), params_file=str(params), progress=False)
    assert sum(calls) == 0  # every run was finished: nothing is trained twice
    assert again["accuracy"] == m["accuracy"]


@pytest.mark.slow  # a stage subprocess per case
@pytest.mark.parametrize("patch, message", [
    ({"candidates": ["mixp"]}, "improve.candidates: unknown technique 'mixp' (did you mean 'mixup'?)"),
    ({"trial_epochs": -2}, "improve.trial_epochs: must be >= 1, got -2"),
    ({"base": {"epochs": 3}}, "improve.base.epochs: set improve.trial_epochs / improve.final_epochs instead"),
    ({"base": {"lr": -1}}, "improve.base.lr: must be > 0"),
    ({"base": {"lr": "high"}}, "improve.base.lr: must be a number"),
    ({"options": {"label_smoothing": 1.5}}, "improve.options.label_smoothing: must be < 1"),
    ({"greedy": "yes"}, "improve.greedy: must be true/false"),
    ({"arch": "sipa_basline"}, "improve.arch: unknown architecture 'sipa_basline'"),
])
def test_bad_params_fail_before_training(tmp_path, patch, message):
    params = write_params(tmp_path, **patch)
    p = subprocess.run([sys.executable, str(ROOT / "stages/improve.py"), "--params", str(params)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "state").exists()  # nothing trained


def test_every_selectable_technique_changes_the_recipe():
    base = default_recipe(schedule="constant", activation="relu")
    for name, tech in TECHNIQUES.items():
        changed = apply_techniques(base, [name], OPTIONS)
        assert (changed != base) != tech.final_only, name


def test_stabilize_runs_its_epochs_at_the_small_rate():
    r = apply_techniques(default_recipe(epochs=1, batch_size=16, lr=0.05, mixup_alpha=1.0), ["stabilize"], OPTIONS)
    res = fit(tiny_model(), tiny_data(), r, progress=False)
    assert [h["lr"] for h in res.history] == [pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 3 / 4))),
                                              OPTIONS["stabilize_lr"]]


def test_a_network_worse_than_the_searched_one_is_said(tmp_path, capsys):
    """The search's trained network (here 8 epochs at lr 0.1) beats an improve run that learns
    nothing (1 epoch at lr 1e-4): the stage says so on stderr and in its metrics."""
    (tmp_path / "models/search").mkdir(parents=True)
    tiny_arch_yaml(tmp_path / "models/search/arch.yaml")  # improve trains the search's architecture
    params = write_params(tmp_path, greedy=False, adopt=[], final_epochs=1, compare_base=False,
                          arch=str(tmp_path / "models/search/arch.yaml"))
    searched = tiny_model()
    fit(searched, tiny_data(n_train=96, n_val=32, n_test=32), default_recipe(epochs=8, batch_size=16, lr=0.1),
        val_split=None, progress=False)
    save_model(tmp_path / "models/search/model.pt", searched.cpu())
    m = improve(read_config(params), params_file=str(params), progress=False)
    assert m["worse_than_input"] is True and m["input_val_accuracy"] > m["val_accuracy"]
    assert "WORSE on validation than the search's trained network" in capsys.readouterr().err


def test_nothing_adopted_trains_the_final_network_once_and_says_so(tmp_path, monkeypatch):
    """No technique adopted on validation: the final network is the base recipe's network, trained
    once (not a second time under another run key), and the claims say nothing was adopted."""
    params = write_params(tmp_path, candidates=["cosine"], threshold=0.9, trial_epochs=1, final_epochs=1)
    calls = []
    real_fit = train_mod.fit

    def counting_fit(*args, **kwargs):
        calls.append(kwargs.get("tag"))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(improve_runs, "fit", counting_fit)
    m = improve(read_config(params), params_file=str(params), progress=False)
    assert m["adopted"] == "-" and m["base_is_final"] is True
    assert m["base_accuracy"] == m["accuracy"] and m["gain_over_base"] == 0.0
    assert calls == ["trial", "trial", "final"]  # base trial, cosine trial, one final training
    assert not (tmp_path / "state/base-final").exists()
    claims = claims_markdown({"improve": m})
    assert "no technique was adopted on validation" in claims and "| nothing adopted |" in claims
    assert "does not hold" not in claims


def test_swish_on_a_network_without_an_activation_key_is_recorded(tmp_path):
    """wrn28_10's spec once had no activation key: swish swapped the modules but the checkpoint
    rebuilt ReLU under swish-trained weights. Now the spec records it and the network rebuilds as trained."""
    (tmp_path / "wrn.yaml").write_text("family: wrn\ndepth: 10\nwiden: 1\nnum_classes: 10\n")
    params = write_params(tmp_path, arch=str(tmp_path / "wrn.yaml"), greedy=False, adopt=["swish"],
                          final_epochs=1, compare_base=False)
    improve(read_config(params), params_file=str(params), progress=False)
    model, ckpt = load_model(tmp_path / "models/improve.pt")
    assert ckpt.arch["activation"] == "swish"
    assert {type(m).__name__ for m in model.modules() if type(m).__name__ in ("ReLU", "SiLU")} == {"SiLU"}
