"""Pruning: masks (global with layer-wise normalisation, layer-wise), filter
removal, masks through training, per-tensor counting, and the stage."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import sipa_core.prune.rounds as prune_rounds
import sipa_core.train as train_mod
from helpers import save_prepared, tiny_data, tiny_model
from sipa_core.checkpoint import load_model, save_model
from sipa_core.errors import SipaError
from sipa_core.lineage import lineage_record
from sipa_core.models import create_model
from sipa_core.prune import gradual
from sipa_core.prune.gradual import zhu_gupta
from sipa_core.prune.masks import (apply_masks, full_masks, layer_table, magnitude_masks, prunable, refresh_spec,
                               remove_filters, sparsity)
from sipa_core.prune import prune, read_config, select_round
from sipa_core.prune.cost import counted_score, masks_for_score, weight_costs
from sipa_core.scoring import REFERENCE_BYTES, REFERENCE_OPS, count
from sipa_core.train import default_recipe, fit

ROOT = Path(__file__).resolve().parents[1]


class TwoLayers(nn.Module):
    """Two weight tensors with hand-picked magnitudes (and a bias, never pruned)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2, bias=True)   # |w| = 1, 2, 3, 4       L2 norm sqrt(30) = 5.477
        self.b = nn.Linear(2, 2, bias=False)  # |w| = 10, 20, 0.5, 40  L2 norm sqrt(2100.25) = 45.83
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
            self.b.weight.copy_(torch.tensor([[10.0, -20.0], [0.5, 40.0]]))


def test_global_with_l2_normalisation_matches_a_hand_computation():
    m = TwoLayers()
    assert list(prunable(m)) == ["a.weight", "b.weight"]
    # Normalised scores: a: 1,2,3,4 / sqrt(30) = .183 .365 .548 .730
    #                    b: 10,20,.5,40 / sqrt(2100.25) = .218 .436 .011 .873
    # 50% of 8 weights = 4 smallest: b.0.5 (.011), a.1 (.183), b.10 (.218), a.2 (.365).
    masks = magnitude_masks(m, full_masks(m), 0.5, scope="global", normalize="l2")
    assert masks["a.weight"].tolist() == [[False, False], [True, True]]
    assert masks["b.weight"].tolist() == [[False, True], [False, True]]
    # Without normalisation the small layer goes first: 0.5, 1, 2, 3 are the four smallest.
    plain = magnitude_masks(m, full_masks(m), 0.5, scope="global", normalize="none")
    assert plain["a.weight"].tolist() == [[False, False], [False, True]]
    assert plain["b.weight"].tolist() == [[True, True], [False, True]]
    # Unequal per-layer sparsity in the normalised global case is what makes it differ from layer-wise.
    apply_masks(m, masks)
    rows = {r["layer"]: r["sparsity"] for r in layer_table(m)}
    assert rows == {"a.weight": 0.5, "b.weight": 0.5}  # here equal by construction; the next case is not
    m2 = TwoLayers()
    masks = magnitude_masks(m2, full_masks(m2), 0.25, scope="global", normalize="l2")  # 2 smallest: b.0.5, a.1
    assert int((~masks["a.weight"]).sum()) == 1 and int((~masks["b.weight"]).sum()) == 1
    masks = magnitude_masks(m2, full_masks(m2), 0.375, scope="global", normalize="l2")  # + b.10
    assert masks["a.weight"].tolist() == [[False, True], [True, True]]  # 25% of layer a
    assert masks["b.weight"].tolist() == [[False, True], [False, True]]  # 50% of layer b
    assert m2.a.bias is not None and "a.bias" not in masks


def test_layerwise_gives_equal_sparsity_and_rounds_are_cumulative():
    m = tiny_model()
    masks = magnitude_masks(m, full_masks(m), 0.5, scope="layerwise")
    apply_masks(m, masks)
    for row in layer_table(m):
        assert row["sparsity"] == pytest.approx(0.5, abs=0.5 / row["numel"] + 1e-9), row
    # Global-normalised on the same model: per-layer sparsity differs across layers.
    g = tiny_model()
    apply_masks(g, magnitude_masks(g, full_masks(g), 0.5, scope="global", normalize="l2"))
    assert len({round(r["sparsity"], 2) for r in layer_table(g)}) > 2
    assert sparsity(g) == pytest.approx(0.5, abs=1e-3)
    # A later round keeps every earlier zero.
    first = magnitude_masks(g, full_masks(g), 0.3, scope="global")
    apply_masks(g, first)
    second = magnitude_masks(g, first, 0.6, scope="global")
    for name in first:
        assert not (second[name] & ~first[name]).any()


def test_masked_weights_stay_zero_through_training():
    data = tiny_data()
    m = tiny_model()
    masks = magnitude_masks(m, full_masks(m), 0.6, scope="global")
    apply_masks(m, masks)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    fit(m, data, default_recipe(epochs=2, batch_size=16, lr=0.1, weight_decay=5e-4), val_split=None,
        after_step=lambda model: apply_masks(model, masks), progress=False)
    for name, p in prunable(m).items():
        assert (p[~masks[name]] == 0).all(), name
        assert not torch.equal(p[masks[name]], before[name][masks[name]]), f"{name} did not train"


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(mod.num_features, generator=g) - 0.5)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_filter_pruning_gives_a_smaller_dense_model_equal_to_the_masked_one(scope):
    m = tiny_model()
    _randomise_bn(m)
    m.eval()
    masked = copy.deepcopy(m)
    x = torch.randn(8, 3, 16, 16)
    n0 = sum(p.numel() for p in m.parameters())
    removed = remove_filters(m, 0.4, x[:1], scope=scope, mirror=masked)
    assert removed > 0
    assert sum(p.numel() for p in m.parameters()) < n0
    with torch.no_grad():
        out_small, out_masked = m(x), masked(x)
    assert out_small.shape == (8, 4)
    # The same function; only the order of float summation differs.
    assert torch.allclose(out_small, out_masked, rtol=0, atol=1e-5), (out_small - out_masked).abs().max()
    # The spec records the new channel counts, so a checkpoint rebuilds the smaller network.
    spec = refresh_spec(m)
    assert spec["channels"]

    rebuilt = create_model(spec)
    rebuilt.load_state_dict(m.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out_small)
    # And the scorer sees a cheaper network.
    assert count(m, (3, 16, 16)).ops < count(masked, (3, 16, 16)).ops


def test_pruned_checkpoint_is_counted_with_per_tensor_sparsity(tmp_path):
    """Hand count: each sparse tensor stores its nonzeros + a 1-bit mask, and
    its layer's multiplies and additions drop by out_elems * fan_in * (1 - d)."""
    m = tiny_model().eval()
    dense = count(m, (3, 16, 16))
    apply_masks(m, magnitude_masks(m, full_masks(m), 0.5, scope="global", normalize="l2"))
    save_model(tmp_path / "p.pt", m)
    loaded, _ = load_model(tmp_path / "p.pt")

    out_elems = {}

    def hook(name):
        return lambda mod, inp, out: out_elems.__setitem__(name, out.numel())

    for name, mod in loaded.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            mod.register_forward_hook(hook(name))
    with torch.no_grad():
        loaded(torch.zeros(1, 3, 16, 16))
    bytes_ = dense.params_bytes
    mults, adds = dense.mults, dense.adds
    for name, p in prunable(loaded).items():
        nz = int(torch.count_nonzero(p))
        d = nz / p.numel()
        if d >= 1 - 1 / 16:
            continue  # cheaper stored dense
        bytes_ += -p.numel() * 2 + nz * 2 + p.numel() / 8
        fan = p.numel() / p.shape[0]
        cut = out_elems[name.rsplit(".", 1)[0]] * fan * (1 - d)
        mults -= cut
        adds -= cut
    pruned = count(loaded, (3, 16, 16))
    assert pruned.params_bytes == pytest.approx(bytes_, rel=1e-12)
    assert pruned.mults == pytest.approx(mults, rel=1e-12)
    assert pruned.adds == pytest.approx(adds, rel=1e-12)
    assert pruned.summary()["score"] < dense.summary()["score"]
    # `sipa score` on the checkpoint agrees.
    out = subprocess.run([sys.executable, "-m", "sipa_core.cli", "score", "--checkpoint", str(tmp_path / "p.pt"),
                          "--input-size", "16", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["params_bytes"] == pytest.approx(bytes_, rel=1e-12)


def test_selection_rule():
    rows = [{"round": 1, "sparsity": 0.3, "select_accuracy": 0.70},
            {"round": 2, "sparsity": 0.5, "select_accuracy": 0.66},
            {"round": 3, "sparsity": 0.6, "select_accuracy": 0.60}]
    assert select_round(rows, 0.70, None, 0.05)["round"] == 2
    assert select_round(rows, 0.70, 0.65, None)["round"] == 2
    assert select_round(rows, 0.70, 0.61, 0.2)["round"] == 2
    assert select_round(rows, 0.70, None, None)["round"] == 3
    assert select_round(rows, 0.70, 0.9, None) is None


def _stage_params(tmp_path, trained_on=("train",), n_val=32, **prune_cfg):
    data = tiny_data(n_train=96, n_val=n_val, n_test=32)
    save_prepared(data, tmp_path / "data.pt")
    model = tiny_model()
    fit(model, data, default_recipe(epochs=3, batch_size=16, lr=0.1), val_split=None, progress=False)
    save_model(tmp_path / "improve.pt", model.cpu(), recipe=default_recipe(batch_size=16, lr=0.1),
               lineage=lineage_record(data, trained_on))
    cfg = {"model": str(tmp_path / "improve.pt"), "data": str(tmp_path / "data.pt"),
           "schedule": [0.3, 0.5, 0.7], "epochs": 1, "recipe": {"lr": 0.02}, "max_drop": None,
           "out": str(tmp_path / "models/prune.pt"), "state": str(tmp_path / "state"),
           "metrics": str(tmp_path / "metrics/prune.json"), "info": str(tmp_path / "info/prune.json"),
           "rounds_table": str(tmp_path / "plots/rounds.csv"),
           "layers_table": str(tmp_path / "plots/layers.csv")}
    cfg.update(prune_cfg)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prune": cfg}))
    return tmp_path / "params.yaml"


def test_stage_runs_rounds_selects_and_resumes(tmp_path, monkeypatch):
    params = _stage_params(tmp_path)
    cfg = read_config(params)
    m = prune(cfg, params_file=str(params), progress=False)
    assert m["chosen_round"] == 3 and not m["passthrough"]  # no requirement: the sparsest round
    assert m["sparsity"] == pytest.approx(0.7, abs=1e-3)
    rows = (tmp_path / "plots/rounds.csv").read_text().splitlines()
    assert rows[0].startswith("round,target,sparsity") and len(rows) == 5  # input + 3 rounds
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3"]
    saved, ckpt = load_model(tmp_path / "models/prune.pt")
    assert sparsity(saved) == pytest.approx(0.7, abs=1e-3)
    assert set(ckpt.masks) == set(prunable(saved)) and ckpt.pruned_round == 3 and ckpt.stage == "prune"
    assert m["params_score"] < m["input_score"]
    for key in ("accuracy", "score", "seed", "device", "torch", "wall_time_s", "select_split"):
        assert key in m

    # A second run trains nothing: every round's result is kept.
    calls = []
    monkeypatch.setattr(prune_rounds, "fit", lambda *a, **k: calls.append(1))  # where the rounds look it up
    again = prune(read_config(params), params_file=str(params), progress=False)
    assert calls == [] and again["score"] == m["score"] and again["accuracy"] == m["accuracy"]

    # Killed after round 2: only round 3 trains again, and the result is the same.
    monkeypatch.undo()
    for result in Path(cfg["state"]).glob("*/round_03/*"):
        result.unlink()
    real_fit = train_mod.fit
    monkeypatch.setattr(prune_rounds, "fit", lambda *a, **k: calls.append(k["tag"]) or real_fit(*a, **k))
    third = prune(read_config(params), params_file=str(params), progress=False)
    assert calls == ["prune-round-3"]
    assert third["score"] == m["score"] and third["accuracy"] == m["accuracy"]


def test_stage_passes_the_input_through_when_no_round_qualifies(tmp_path):
    params = _stage_params(tmp_path, schedule=[0.9], epochs=0, min_accuracy=1.0)
    m = prune(read_config(params), params_file=str(params), progress=False)
    assert m["passthrough"] and m["chosen_round"] == 0
    out, _ = load_model(tmp_path / "models/prune.pt")
    ref, _ = load_model(tmp_path / "improve.pt")
    for (n, a), (_, b) in zip(out.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_filter_pruning_rounds_channel_counts_to_a_multiple(scope):
    def counts(model):
        return [c.out_channels for c in model.modules() if isinstance(c, nn.Conv2d)]

    torch.manual_seed(0)
    m = tiny_model().eval()
    for p in m.parameters():
        p.data.normal_()
    before = counts(m)
    assert remove_filters(m, 0.3, torch.zeros(1, 3, 16, 16), scope=scope, round_to=4) > 0
    changed = [(a, b) for a, b in zip(before, counts(m)) if a != b]
    assert changed and all(b % 4 == 0 for _, b in changed), list(zip(before, counts(m)))


def test_stage_filter_granularity_shrinks_the_network(tmp_path):
    params = _stage_params(tmp_path, granularity="filter", schedule=[0.2, 0.4], epochs=1)
    m = prune(read_config(params), params_file=str(params), progress=False)
    saved, _ = load_model(tmp_path / "models/prune.pt")
    assert saved.spec["channels"] and m["chosen_round"] == 2
    dense = count(tiny_model(), (3, 16, 16)).summary()
    assert m["params"] < dense["params"] and m["ops"] < dense["ops"]
    assert m["sparsity"] == pytest.approx(1 - m["params"] / dense["params"])
    assert sum(p.numel() for p in saved.parameters()) < sum(p.numel() for p in tiny_model().parameters())


@pytest.mark.parametrize("change, message", [
    ({"schedule": []}, "prune.schedule: must list at least one"),
    ({"schedule": [0.5, 0.3]}, "prune.schedule: sparsity targets must increase"),
    ({"schedule": [0.004, 0.005], "target": "score"}, "prune.schedule: score targets must decrease"),
    ({"normalize": "score", "granularity": "filter"}, "prune.normalize: score needs granularity: weight"),
    ({"target": "score", "method": "gradual"}, "prune.target: score needs method: rounds"),
    ({"target": "ops"}, "prune.target"),
    ({"schedule": [0.5, 1.0]}, "prune.schedule: every target must be in (0, 1)"),
    ({"scope": "globl"}, "prune.scope"),
    ({"epochs": -1}, "prune.epochs"),
    ({"recipe": {"lr": -1}}, "prune.recipe.lr"),
    ({"sparsity": 0.5}, "prune.sparsity"),
    ({"method": "gradual", "granularity": "filter"}, "prune.method: gradual prunes weights"),
    ({"method": "slow"}, "prune.method"),
    ({"round_to": 8}, "prune.round_to: rounds channel counts, which only filter pruning changes"),
    ({"round_to": 0, "granularity": "filter"}, "prune.round_to"),
])
def test_bad_params_exit_2_naming_the_key(tmp_path, change, message, run_script):
    cfg = {"schedule": [0.5], **change}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prune": cfg}))
    code, _, err = run_script(ROOT / "stages/prune.py", "--params", tmp_path / "params.yaml", cwd=tmp_path)
    assert code == 2
    assert message in err and str(tmp_path / "params.yaml") in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_choice_on_a_split_the_input_trained_on_is_refused(tmp_path, run_script):
    """The input model trained on train + val (no_validation): choosing the round on val is
    refused before any training, exit 2, one line naming the key, nothing written."""
    params = _stage_params(tmp_path, trained_on=("train", "val"))
    code, _, err = run_script(ROOT / "stages/prune.py", "--params", params, cwd=tmp_path)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    assert "prune.select_split" in err and "trained on train+val" in err and str(params) in err
    assert not (tmp_path / "state").exists() and not (tmp_path / "models").exists()
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "plots").exists()


def test_no_silent_fallback_to_test(tmp_path, run_script):
    """Without a validation split the stage stops; choosing on test must be asked for, and is marked."""
    params = _stage_params(tmp_path, n_val=0)
    code, _, err = run_script(ROOT / "stages/prune.py", "--params", params, cwd=tmp_path)
    assert code == 2 and "prune.select_split" in err and "prepare.val_size: 0" in err, err
    params = _stage_params(tmp_path, n_val=0, select_split="test", schedule=[0.3], epochs=0)
    m = prune(read_config(params), params_file=str(params), progress=False)
    assert m["select_split"] == "test" and m["chosen_on_test"] is True


def test_zhu_gupta_schedule_by_hand():
    # s_t = s_f + (s_i - s_f)(1 - t/T)^3 with s_i = 0, s_f = 0.8, T = 100
    assert zhu_gupta(0, 100, 0.0, 0.8) == 0.0
    assert zhu_gupta(50, 100, 0.0, 0.8) == pytest.approx(0.8 - 0.8 * 0.125)
    assert zhu_gupta(100, 100, 0.0, 0.8) == zhu_gupta(500, 100, 0.0, 0.8) == 0.8
    values = [zhu_gupta(t, 100, 0.1, 0.8) for t in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:])) and values[0] == pytest.approx(0.1)


@pytest.mark.slow  # stage subprocesses, one killed
def test_gradual_method_prunes_in_one_run_and_resumes(tmp_path, monkeypatch):
    """One training of epochs + gradual_finetune_epochs reaches the last target; the masks rise on
    the schedule (checked at every update) and a killed run resumes at its epoch."""
    seen = []
    real = gradual.magnitude_masks
    monkeypatch.setattr(gradual, "magnitude_masks", lambda m, k, t, **kw: seen.append(t) or real(m, k, t, **kw))
    params = _stage_params(tmp_path, method="gradual", epochs=2, gradual_every=2, gradual_finetune_epochs=1)
    m = prune(read_config(params), params_file=str(params), progress=False)
    assert m["rounds"] == 1 and m["chosen_round"] == 1 and m["sparsity"] == pytest.approx(0.7, abs=1e-3)
    # 96 images, batch 16: 6 steps per epoch, 12 pruning steps, an update every 2 (the last at step 12)
    assert seen == pytest.approx([0.7 + (0.0 - 0.7) * (1 - t / 12) ** 3 for t in (2, 4, 6, 8, 10, 12)])
    rows = (tmp_path / "plots/rounds.csv").read_text().splitlines()
    epochs = rows[0].split(",").index("epochs")
    assert len(rows) == 3 and rows[2].split(",")[epochs] == "3"  # input + the one run of 3 epochs
    saved, _ = load_model(tmp_path / "models/prune.pt")
    assert sparsity(saved) == pytest.approx(0.7, abs=1e-3)
    assert m["images_trained"] == 3 * 96

    # Killed after its first epoch (mid-pruning), run again: it resumes at step 6 with the masks of
    # its weights, and ends with the weights of the uninterrupted run.

    other = tmp_path / "killed"
    other.mkdir()
    params_b = _stage_params(other, method="gradual", epochs=2, gradual_every=2, gradual_finetune_epochs=1)
    env = {**os.environ, "SIPA_FAULT": "epoch:1", "PYTHONPATH": str(ROOT / "tests")}
    killed = subprocess.run([sys.executable, str(ROOT / "stages/prune.py"), "--params", str(params_b)], env=env,
                            cwd=other, capture_output=True, text=True)
    assert killed.returncode == -9 and not (other / "models/prune.pt").exists()
    again = subprocess.run([sys.executable, str(ROOT / "stages/prune.py"), "--params", str(params_b)],
                           cwd=other, capture_output=True, text=True)
    assert again.returncode == 0 and "resuming after epoch 1/3" in again.stderr, again.stderr
    whole = tmp_path / "whole"  # the same run uninterrupted, in a process of its own too
    whole.mkdir()
    params_c = _stage_params(whole, method="gradual", epochs=2, gradual_every=2, gradual_finetune_epochs=1)
    assert subprocess.run([sys.executable, str(ROOT / "stages/prune.py"), "--params", str(params_c)],
                          cwd=whole, capture_output=True).returncode == 0
    resumed, uninterrupted = load_model(other / "models/prune.pt")[0], load_model(whole / "models/prune.pt")[0]
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_weights_cost_in_the_score_by_hand():
    """16 bits, strict accounting: a stored weight is 2 bytes; each use per example one multiply at
    16/32 and one addition at 32/32 of an op: a 3x3 conv at 8x8 output uses each weight 64 times."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    costs = weight_costs(model, (3, 8, 8), 16)
    assert costs["0.weight"].params == pytest.approx(2 / REFERENCE_BYTES)
    assert costs["0.weight"].ops == pytest.approx(64 * 1.5 / REFERENCE_OPS)
    assert costs["4.weight"].ops == pytest.approx(1.5 / REFERENCE_OPS)
    assert costs["4.weight"].dead_zone(0.95) and not costs["4.weight"].dead_zone(0.93)  # sparse below 15/16
    assert not costs["4.weight"].dead_zone(1.0)  # not pruned: nothing to save, nothing lost


def _two_layers():
    """Two 10x10 linear layers, equal in cost: A with 5 small weights, B with 30."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(10, 10), nn.Linear(10, 10))
    with torch.no_grad():
        for layer, small, value in ((model[1], 5, 0.001), (model[2], 30, 0.01)):
            layer.weight.fill_(1.0)
            layer.weight.view(-1)[:small] = value
    return model


def test_score_aware_pruning_leaves_a_tensor_it_would_prune_too_little_to_store_sparse():
    """20 of 200 weights: by L2-normalised magnitude, A's 5 smallest and 15 of B's; but A at 95%
    density is still stored dense (sparse only below 15/16 at 16 bits) and would save nothing, so
    score-aware pruning leaves A whole and takes all 20 from B."""
    model = _two_layers()
    masks = full_masks(model)
    l2 = magnitude_masks(model, masks, 0.1, normalize="l2")
    assert (~l2["1.weight"]).sum() == 5 and (~l2["2.weight"]).sum() == 15
    aware = magnitude_masks(model, masks, 0.1, normalize="score", costs=weight_costs(model, (10, 1, 1), 16))
    assert aware["1.weight"].all() and (~aware["2.weight"]).sum() == 20
    assert not aware["2.weight"].view(-1)[:20].any()  # B's smallest
    with pytest.raises(SipaError, match="normalize: score needs"):
        magnitude_masks(model, masks, 0.1, normalize="score")


def test_score_aware_pruning_removes_the_expensive_weights_first():
    """The conv's weights (4,096 uses per example) go before the classifier's (one use), though their
    normalised magnitudes are larger: the ranking is magnitude per unit of counted score."""
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(8), nn.Flatten(),
                          nn.Linear(64, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1 / 3)  # L2 norm 1: each normalised weight 1/3
        model[3].weight.fill_(1 / 8)  # L2 norm 1: each 1/8, smaller than the conv's
    masks = full_masks(model)
    l2 = magnitude_masks(model, masks, 0.1, normalize="l2")
    assert l2["0.weight"].all() and (~l2["3.weight"]).sum() == 7
    costs = weight_costs(model, (1, 64, 64), 16)
    assert costs["0.weight"].ops == pytest.approx(4096 * 1.5 / REFERENCE_OPS)
    aware = magnitude_masks(model, masks, 0.1, normalize="score", costs=costs)
    assert (~aware["0.weight"]).sum() == 7 and aware["3.weight"].all()


def test_a_score_target_is_met_with_the_least_sparsity():
    model = tiny_model()
    masks, shape = full_masks(model), (3, 16, 16)
    dense = counted_score(model, masks, shape, 16)
    target = 0.6 * dense
    costs = weight_costs(model, shape, 16)

    def make(s):
        return magnitude_masks(model, masks, s, normalize="score", costs=costs)

    found, s = masks_for_score(make, model, target, 0.0, shape, 16)
    assert counted_score(model, found, shape, 16) <= target < counted_score(model, make(s - 0.01), shape, 16)
    with pytest.raises(SipaError, match="cannot be reached"):
        masks_for_score(make, model, 1e-9, 0.0, shape, 16)


def test_stage_prunes_to_score_targets(tmp_path):
    dense = count(tiny_model(), (3, 16, 16)).summary()["score"]
    targets = [round(0.7 * dense, 6), round(0.5 * dense, 6)]
    params = _stage_params(tmp_path, schedule=targets, target="score", normalize="score")
    m = prune(read_config(params), params_file=str(params), progress=False)
    rows = [r.split(",") for r in (tmp_path / "plots/rounds.csv").read_text().splitlines()[1:]]
    header = (tmp_path / "plots/rounds.csv").read_text().splitlines()[0].split(",")
    score = header.index("score")
    assert [float(r[header.index("target")]) for r in rows[1:]] == targets
    assert all(float(r[score]) <= t for r, t in zip(rows[1:], targets))
    assert m["chosen_round"] == 2 and m["score"] <= targets[-1]  # no requirement: the lowest score
