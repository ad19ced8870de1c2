"""Early exit: the authors' figures, softsmoothing, frozen training, adaptive
inference, validation-only calibration, and the stage."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

import sipa_core.accelerate.training as exit_training
from helpers import save_prepared, tiny_data, tiny_model
from sipa_core.accelerate import accelerate, load_early_exit, read_config
from sipa_core.accelerate.compare import _at_target
from sipa_core.accelerate.rule import ThresholdPoint, choose
from sipa_core.accelerate.training import exit_train_mode
from sipa_core.checkpoint import save_model
from sipa_core.accelerate.exits import (EarlyExitNetwork, exit_config, exit_cost, risk_coverage, simulate,
                                  softsmoothing_loss)
from sipa_core.models import create_model
from sipa_core.prune.masks import prunable
from sipa_core.data.prepared import load_prepared
from sipa_core.train import default_recipe, fit, sixteen_bit, normalized
from sipa_core.train.evaluation import SplitReader

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6


def test_authors_exit_after_block_4_at_64_percent():
    """The authors' exit (their public code, Lee-Gihun/MicroNet_OSI-AI): after block 4 of
    sipa_baseline, main at 64% uniform sparsity, exit ratio 0.3217 -> params 0.455319 MB, scores
    0.003119 + 0.002847."""
    main = create_model("sipa_baseline")
    net = EarlyExitNetwork(main, exit_config(main, 4))
    assert net.exit_cfg.channels == 48 and net.exit_cfg.size == 15 and net.exit_cfg.width == 136
    cost = exit_cost(net, (3, 32, 32), main_uniform_sparsity=0.64)
    assert cost.exit_bytes == 41_688 and cost.exit_ops == 2_503_432
    s = cost.summary(0.3217)
    assert s["params_mb"] == pytest.approx(0.455319, abs=TOL)
    assert s["params_score"] == pytest.approx(0.003119, abs=TOL)
    assert s["ops_score"] == pytest.approx(0.002847, abs=TOL)
    assert s["ops"] == pytest.approx(0.3217 * (cost.path_ops + cost.exit_ops)
                                     + 0.6783 * (cost.full_ops + cost.exit_ops))
    out = subprocess.run([sys.executable, "-m", "sipa_core.cli", "score", "--arch", "sipa_baseline",
                          "--uniform-sparsity", "0.64", "--exit-after", "4", "--exit-ratio", "0.3217", "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert cli["params_score"] == pytest.approx(0.003119, abs=TOL)
    assert cli["ops_score"] == pytest.approx(0.002847, abs=TOL)


def test_softsmoothing_is_one_plus_confidence_times_ce_with_gradient_through_confidence():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.4, 0.3]], requires_grad=True)
    targets = F.one_hot(torch.tensor([0, 2]), 3).float()
    p = F.softmax(logits, 1)
    expected = ((1 + p.max(1).values) * F.cross_entropy(logits, torch.tensor([0, 2]), reduction="none")).mean()
    loss = softsmoothing_loss(logits, targets)
    assert loss.item() == pytest.approx(expected.item())
    g, = torch.autograd.grad(loss, logits)
    detached = ((1 + p.max(1).values.detach()) * F.cross_entropy(logits, torch.tensor([0, 2]),
                                                                 reduction="none")).mean()
    g_detached, = torch.autograd.grad(detached, logits)
    assert not torch.allclose(g, g_detached)  # the confidence term is trained, not a constant weight


def _trained_tiny(data):
    model = tiny_model()
    fit(model, data, default_recipe(epochs=3, batch_size=16, lr=0.1), val_split=None, progress=False)
    return model.cpu().eval()


@pytest.mark.parametrize("update_bn", [False, True])
def test_frozen_main_weights_do_not_change(update_bn):
    data = tiny_data()
    main = _trained_tiny(data)
    before = {k: v.clone() for k, v in main.state_dict().items()}
    for p in main.parameters():
        p.requires_grad_(False)
    net = EarlyExitNetwork(main, exit_config(main, 0))
    exit_before = {k: v.clone() for k, v in net.exit.state_dict().items()}
    fit(net, data, default_recipe(epochs=2, batch_size=16, lr=0.1), params=net.exit.parameters(),
        loss_fn=softsmoothing_loss, train_mode=exit_train_mode(update_bn), val_split=None, progress=False)
    after = main.state_dict()
    for k, v in before.items():
        if update_bn and ("running_" in k or "num_batches" in k):
            continue
        assert torch.equal(v, after[k]), k
    bn_moved = any(not torch.equal(before[k], after[k]) for k in before if "running_mean" in k)
    assert bn_moved == update_bn
    assert any(not torch.equal(v, net.exit.state_dict()[k]) for k, v in exit_before.items())


def test_adaptive_inference_equals_simulated_predictions():
    torch.manual_seed(0)
    main = tiny_model().eval()
    net = EarlyExitNetwork(main, exit_config(main, 0)).eval()
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        exit_logits, main_logits = net.both(x)
    conf = F.softmax(exit_logits, 1).amax(1)
    for t in [0.0, float(conf.median()), float(conf.quantile(0.8)), 1.0]:
        pred, exited = simulate(exit_logits, main_logits, t)
        logits, real_exited = net.adaptive(x, t)
        assert torch.equal(real_exited, exited)
        assert torch.equal(logits.argmax(1), pred)
    assert simulate(exit_logits, main_logits, 1.0)[1].sum() == 0  # nothing is more confident than 1


def test_choose_and_risk_coverage():
    c = [ThresholdPoint(0, 0.5, 0.8, 0.60, score=0.1), ThresholdPoint(0, 0.9, 0.4, 0.70, score=0.2),
         ThresholdPoint(1, 0.9, 0.5, 0.69, score=0.15)]
    assert choose(c, 0.65).position == 1
    assert choose(c, 0.70).threshold == 0.9 and choose(c, 0.70).position == 0
    assert choose(c, 0.71) is None
    logits = torch.tensor([[5.0, 0], [4.0, 0], [0, 3.0], [2.0, 0]])  # confidences in this order
    labels = torch.tensor([0, 1, 1, 1])
    curve, aurc = risk_coverage(logits, labels, points=4)
    assert [r for _, r in curve] == [0.0, 0.5, pytest.approx(1 / 3), 0.5]
    assert aurc == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)


@pytest.fixture(scope="module")
def main_ckpt(tmp_path_factory):
    """A trained tiny main network, saved once for the stage tests."""
    path = tmp_path_factory.mktemp("main") / "prune.pt"
    save_model(path, _trained_tiny(tiny_data(n_train=96, n_val=48, n_test=48)),
               recipe=default_recipe(batch_size=16, lr=0.1))
    return path


def _stage_params(tmp_path, main_ckpt, test_seed=0, wrong_val_labels=False, **acc_cfg):
    data = tiny_data(n_train=96, n_val=48, n_test=48)
    if wrong_val_labels:  # nothing can reach a high validation accuracy
        data.val_y = data.val_y.roll(1)
    if test_seed:  # a different test split, same train and validation
        other = tiny_data(n_train=96, n_val=48, n_test=48, seed=test_seed)
        data.test_x, data.test_y = other.test_x, other.test_y.roll(1)
    save_prepared(data, tmp_path / "data.pt")
    cfg = {"model": str(main_ckpt), "data": str(tmp_path / "data.pt"), "positions": [0],
           "epochs": 2, "recipe": {"lr": 0.05}, "max_drop": 0.2, "thresholds": [0.3, 0.5, 0.7, 0.9],
           "table_thresholds": [0.5, 0.9], "allow_no_exit": False,
           "out": str(tmp_path / "models/acc.pt"), "state": str(tmp_path / "state"),
           "metrics": str(tmp_path / "metrics/acc.json"), "info": str(tmp_path / "info/acc.json"),
           "table": str(tmp_path / "plots/exits.csv"),
           "risk_coverage": str(tmp_path / "plots/rc.csv")}
    cfg.update(acc_cfg)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"accelerate": cfg}))
    return tmp_path / "params.yaml"


def test_stage_trains_calibrates_on_validation_and_resumes(tmp_path, monkeypatch, main_ckpt):
    (tmp_path / "a").mkdir()
    trained = {"recipe": {"lr": 0.05, "batch_size": 16}}  # enough exit steps that some images leave
    params = _stage_params(tmp_path / "a", main_ckpt, **trained)
    m = accelerate(read_config(params), params_file=str(params), progress=False)
    assert not m["passthrough"] and m["exit_position"] == 0 and m["threshold"] in (0.3, 0.5, 0.7, 0.9)
    assert m["adaptive_matches_simulated"] is True
    assert m["val_accuracy"] >= m["val_target"]
    for key in ("score", "params_score", "ops_score", "accuracy", "path_accuracy", "aurc_softsmoothing",
                "aurc_cross_entropy", "cross_entropy_exit_ratio", "cross_entropy_accuracy", "seed", "device",
                "torch", "wall_time_s", "ops_saving"):
        assert key in m, key
    rc = (tmp_path / "a/plots/rc.csv").read_text().splitlines()
    assert rc[0] == "coverage,risk_softsmoothing,risk_cross_entropy" and len(rc) == 101
    table = (tmp_path / "a/plots/exits.csv").read_text().splitlines()
    assert table[0].startswith("position,channels,size,path_ops_ratio") and len(table) >= 3
    net, record = load_early_exit(tmp_path / "a/models/acc.pt")
    assert record.threshold == m["threshold"] and record.exit_ratio == m["exit_ratio"]
    # The test exit ratio, recomputed from the saved exit: the share of test images whose exit
    # confidence (maximum softmax, fp16 weights as bits 16 scores them) is above the threshold.
    data = load_prepared(tmp_path / "a/data.pt")
    with torch.no_grad():
        conf = F.softmax(sixteen_bit(net)(normalized(data.test_x, data.mean, data.std)).float(), 1).amax(1)
    assert m["exit_ratio"] == pytest.approx(float((conf > m["threshold"]).float().mean()), abs=1e-6)
    assert 0 < m["exit_ratio"] < 1 and m["val_exit_ratio"] > 0  # some images leave, not all
    out = subprocess.run([sys.executable, "-m", "sipa_core.cli", "score", "--checkpoint",
                          str(tmp_path / "a/models/acc.pt"), "--json"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["score"] == pytest.approx(m["score"])

    # Re-calibration (another target) trains nothing and recomputes no cached logits.
    calls = []
    monkeypatch.setattr(exit_training, "fit", lambda *a, **k: calls.append(1))  # where exit training looks them up
    monkeypatch.setattr(exit_training, "predict", lambda *a, **k: calls.append(2))
    monkeypatch.setattr(SplitReader, "logits", lambda *a, **k: calls.append(3))
    cfg = read_config(_stage_params(tmp_path / "a", main_ckpt, max_drop=0.5, **trained))
    again = accelerate(cfg, params_file=str(params), progress=False)
    assert calls == [] and again["val_target"] < m["val_target"]

    # Same train and validation data, another test split: the same choice.
    monkeypatch.undo()
    (tmp_path / "b").mkdir()
    params_b = _stage_params(tmp_path / "b", main_ckpt, test_seed=7, **trained)
    b = accelerate(read_config(params_b), params_file=str(params_b), progress=False)
    assert (b["exit_position"], b["threshold"], b["val_exit_ratio"]) == (m["exit_position"], m["threshold"],
                                                                        m["val_exit_ratio"])
    assert b["accuracy"] != m["accuracy"]


def test_stage_without_a_reachable_target_passes_the_main_network_through(tmp_path, main_ckpt):
    (tmp_path / "c").mkdir()
    params = _stage_params(tmp_path / "c", main_ckpt, wrong_val_labels=True, max_drop=None, min_accuracy=0.9,
                           compare_loss=False, epochs=1)
    m = accelerate(read_config(params), params_file=str(params), progress=False)
    assert m["passthrough"] and m["exit_position"] is None and m["exit_ratio"] == 0.0


@pytest.mark.parametrize("change, message", [
    ({"positions": [5]}, "accelerate.positions: block 5 is past"),
    ({"positions": []}, "accelerate.positions: must list"),
    ({"thresholds": [0.5, 1.5]}, "accelerate.thresholds: every threshold must be in [0, 1]"),
    ({"loss": "focal"}, "accelerate.loss"),
    ({"epochs": 0}, "accelerate.epochs"),
])
def test_bad_params_exit_2_naming_the_key(tmp_path, change, message, main_ckpt, run_script):
    (tmp_path / "d").mkdir()
    params = _stage_params(tmp_path / "d", main_ckpt, **change)
    code, _, err = run_script(ROOT / "stages/accelerate.py", "--params", params, cwd=tmp_path)
    assert code == 2, err
    assert message in err and str(params) in err, err
    assert len(err.strip().splitlines()) == 1


def test_exit_pruning_reuses_the_pruning_code(tmp_path, main_ckpt):
    (tmp_path / "e").mkdir()
    params = _stage_params(tmp_path / "e", main_ckpt, exit_schedule=[0.25, 0.5], exit_prune_epochs=1,
                           exit_stabilize_epochs=1, compare_loss=False, epochs=1, max_drop=1.0)
    m = accelerate(read_config(params), params_file=str(params), progress=False)
    assert not m["passthrough"] and m["exit_sparsity"] == pytest.approx(0.5, abs=0.01)
    net, _ = load_early_exit(tmp_path / "e/models/acc.pt")
    zeros = sum(int((p == 0).sum()) for p in prunable(net.exit).values())
    total = sum(p.numel() for p in prunable(net.exit).values())
    assert zeros / total == pytest.approx(0.5, abs=0.01)
    dense = exit_cost(EarlyExitNetwork(net.main, net.exit_cfg), (3, 16, 16))
    assert m["exit_bytes"] < dense.exit_bytes  # the sparse exit is counted with its own sparsity
    # Two pruning rounds and the stabilisation each really trained the exit (momentum buffers exist).
    for name in ("prune_01.pt", "prune_02.pt", "stabilize.pt"):
        (state_file,) = (tmp_path / "e").rglob(name)
        state = torch.load(state_file, weights_only=True)
        assert state["epoch"] == 1 and state["optimizer"]["state"], name


def test_compared_loss_is_calibrated_at_the_same_validation_target():
    """The other loss's exit gets the threshold that sends most validation images out while
    meeting the target; its test exit ratio and accuracy are read at that threshold."""
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])  # image 2: confidently wrong
    saved = {"val": probs.log(), "test": probs.log()}
    main = {"val": torch.tensor([[1.0, 0.0]] * 4), "test": torch.tensor([[1.0, 0.0]] * 4)}
    labels = torch.zeros(4, dtype=torch.long)
    trainer = SimpleNamespace(cfg={"thresholds": [0.5, 0.85]}, splits=SimpleNamespace(labels=lambda split: labels))
    # 0.5: all four leave (val accuracy 3/4); 0.85: images 0, 1 leave (4/4, the rest from the main net).
    assert _at_target(trainer, saved, main, 0.9, "ce") == {"ce_threshold": 0.85, "ce_exit_ratio": 0.5,
                                                           "ce_accuracy": 1.0}
    assert _at_target(trainer, saved, main, 0.7, "ce") == {"ce_threshold": 0.5, "ce_exit_ratio": 1.0,
                                                           "ce_accuracy": 0.75}
    assert _at_target(trainer, saved, main, 1.01, "ce")["ce_threshold"] is None
