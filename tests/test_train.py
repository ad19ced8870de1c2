"""The training engine: each recipe knob does what it claims; runs resume exactly."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import tiny_data, tiny_model
from sipa_core.errors import SipaError
from sipa_core.train import (GhostBatchNorm2d, apply_ghost_bn, check_recipe, configure_model, default_recipe,
                             evaluate, fit, sixteen_bit)
from sipa_core.train.augment import PolicyAugment, cutmix, mixup, random_crop, random_flip, soft_targets
from sipa_core.train.optim import lr_factor, param_groups


def test_soft_targets_smoothing_and_mixing_sum_to_one():
    y = torch.tensor([0, 3, 1, 2])
    t = soft_targets(y, 4, 0.3)
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert t[0, 0] == pytest.approx(0.7 + 0.3 / 4) and t[0, 1] == pytest.approx(0.3 / 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    xm, tm = mixup(x, t, 1.0, g)
    assert torch.allclose(tm.sum(1), torch.ones(4)) and not torch.equal(xm, x)
    xc, tc = cutmix(x, t, 1.0, g)
    assert torch.allclose(tc.sum(1), torch.ones(4))


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_pastes_a_box_of_a_partner_image_and_mixes_labels_by_its_area(seed):
    """Every pixel of ``x`` differs (Gaussian noise), so where an output image differs from its
    original shows the pasted box; the box must hold one other image's pixels at the same place,
    the same box in every image, and each label must mix by the box's share of the image."""
    n, h, w = 6, 12, 16
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(100 + seed))
    t = soft_targets(torch.arange(n) % 4, 4, 0.1)
    xc, tc = cutmix(x, t, 1.0, torch.Generator().manual_seed(seed))
    changed = (xc != x).any(1)  # n, h, w
    box = changed.any(0)
    rows, cols = box.any(1).nonzero().squeeze(1), box.any(0).nonzero().squeeze(1)
    assert len(rows) and len(cols), "nothing was pasted"
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    assert box[y0:y1, x0:x1].all() and box.sum() == (y1 - y0) * (x1 - x0)  # one rectangle
    area = (y1 - y0) * (x1 - x0) / (h * w)
    assert area < 1
    partners = []
    for i in range(n):
        if not changed[i].any():  # paired with itself: unchanged, its own label
            assert torch.equal(xc[i], x[i]) and torch.allclose(tc[i], t[i])
            continue
        assert torch.equal(changed[i], box)  # the same box in every image that got another's
        (j,) = [j for j in range(n) if torch.equal(xc[i, :, y0:y1, x0:x1], x[j, :, y0:y1, x0:x1])]
        assert j != i
        outside = ~box
        assert torch.equal(xc[i][:, outside], x[i][:, outside])  # the rest is the original image
        assert torch.allclose(tc[i], (1 - area) * t[i] + area * t[j])
        partners.append(j)
    assert len(partners) >= 2 and len(set(partners)) == len(partners)  # a permutation of the batch


def test_random_crop_and_flip_are_per_image_windows():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(6):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert hits, "each crop is a window of its own padded image"
        offsets.add(hits[0])
    assert len(offsets) > 1  # offsets differ between images
    f = random_flip(x, torch.Generator().manual_seed(0))
    kinds = [torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(2)) for i in range(6)]
    assert all(kinds)
    assert any(not torch.equal(f[i], x[i]) for i in range(6))


@pytest.mark.parametrize("name", ["autoaugment", "randaugment", "trivialaugment"])
def test_policies_keep_a_uint8_batch(name):
    torch.manual_seed(0)
    x = torch.randint(0, 255, (16, 3, 16, 16), dtype=torch.uint8)
    out = PolicyAugment(name, group=4)(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert not torch.equal(out, x)


def test_no_bias_and_no_bn_decay_groups():
    model = tiny_model()
    params = list(model.parameters())
    groups = param_groups(model, params, 1e-4, no_bias_decay=True, no_bn_decay=False)
    zero = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in zero) == name.endswith("bias"), name
    groups = param_groups(model, params, 1e-4, no_bias_decay=False, no_bn_decay=True)
    zero = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    bn = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert zero == bn
    assert len(param_groups(model, params, 1e-4, False, False)) == 1


def test_ghost_batchnorm_normalises_per_virtual_batch():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4) * torch.arange(1, 9).view(8, 1, 1, 1)
    ghost = GhostBatchNorm2d(3, virtual_batch=4)
    ghost.load_state_dict(bn.state_dict())
    out = ghost.train()(x)
    ref = torch.cat([nn.BatchNorm2d(3).train()(c) for c in x.split(4)])
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, nn.BatchNorm2d(3).train()(x), atol=1e-3)
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(ghost.state_dict())
    assert torch.equal(ghost.eval()(x), plain.eval()(x))  # evaluation: a plain BatchNorm
    model = tiny_model()
    keys = set(model.state_dict())
    n = apply_ghost_bn(model, 16)
    assert n == sum(isinstance(m, GhostBatchNorm2d) for m in model.modules()) > 0
    assert set(model.state_dict()) == keys  # checkpoints stay interchangeable


def test_activation_swap_and_spec():
    model = tiny_model()
    configure_model(model, default_recipe(activation="relu", dropout=0.5, drop_connect=0.1))
    assert not any(isinstance(m, nn.SiLU) for m in model.modules())
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    assert model.spec["activation"] == "relu" and model.spec["dropout"] == 0.5
    assert model.dropout.p == 0.5 and model.blocks[1].drop_rate == pytest.approx(0.05)


def test_lr_schedule_shapes():
    r = default_recipe(epochs=10, lr=0.2, warmup_epochs=2, lr_min=0.02, stabilize_epochs=2, stabilize_lr=0.002)
    f = [lr_factor(s, r, 10) for s in range(120)]
    assert f[0] == pytest.approx(0.05) and f[19] == pytest.approx(1.0)  # linear warmup over 20 steps
    assert f[20] == pytest.approx(1.0) and f[99] == pytest.approx(0.1, abs=0.01)  # cosine down to lr_min
    assert all(a >= b for a, b in zip(f[20:100], f[21:100]))
    assert f[100:] == [pytest.approx(0.01)] * 20  # stabilisation at stabilize_lr
    s = default_recipe(epochs=6, schedule="step", step_every=2, step_gamma=0.5)
    assert [lr_factor(e * 5, s, 5) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_fp16_evaluation_uses_16_bit_weights():
    model = tiny_model()
    with torch.no_grad():
        model.classifier.weight.add_(1e-4 * torch.randn_like(model.classifier.weight))
    h = sixteen_bit(model)
    assert torch.equal(h.classifier.weight, model.classifier.weight.half().float())
    assert not torch.equal(h.classifier.weight, model.classifier.weight)
    data = tiny_data()
    assert evaluate(model, data, "test", fp16=True) == evaluate(h, data, "test")


class _RoundingProbe(nn.Module):
    """Logits 1000 (w - 1, c - 1) whatever the image: ``w`` a weight of 1 + 4e-4, ``c`` a constant
    1 + 2e-4 that is not a parameter or buffer (the difference taken inside one forward, so rounding
    the output keeps it). In fp32, w > c (class 0); fp16 has a step of 2**-10 just above 1,
    so w rounds to 1 < c (class 1). ``seen`` gets the weight each forward used (a copy of the
    network, as the fp16 evaluation makes, still reports to the same list)."""

    def __init__(self, seen: list):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1 + 4e-4))
        self.c = torch.tensor(1 + 2e-4)
        self.report = lambda w: seen.append(w.detach().clone())  # a function: deepcopy shares it

    def forward(self, x):
        self.report(self.w)
        return (1000 * (torch.stack([self.w, self.c]) - 1)).expand(x.shape[0], 2)


class _Shift(nn.Module):
    def __init__(self, by: float):
        super().__init__()
        self.by = by

    def forward(self, x):
        return x + self.by


def test_sixteen_bit_rounds_the_input_and_every_module_output():
    # 1 + 1e-4 is not an fp16 number (its step above 1 is 2**-10): run at 16 bits, the sum after
    # the first module rounds to 1 and the second gives 0; in fp32 the 1e-4 comes through.
    net = nn.Sequential(_Shift(1.0), _Shift(-1.0))
    x = torch.full((2, 3), 1e-4)
    assert torch.allclose(net(x), x, atol=1e-7)
    assert torch.equal(sixteen_bit(net)(x), torch.zeros_like(x))
    # The input itself is rounded: 1 + 1e-4 enters as 1.
    assert torch.equal(sixteen_bit(nn.Identity())(torch.full((1,), 1 + 1e-4)), torch.ones(1))
    assert torch.allclose(net(x), x, atol=1e-7)  # the network itself is untouched


def test_fp16_evaluation_evaluates_the_fp16_rounded_weights():
    data = tiny_data()
    data.test_y = torch.zeros_like(data.test_y)  # class 0 everywhere: right in fp32, wrong in fp16
    seen = []
    probe = _RoundingProbe(seen)
    assert evaluate(probe, data, "test") == 1.0 and seen[-1] == probe.w
    assert evaluate(probe, data, "test", fp16=True) == 0.0
    assert probe.w.item() == pytest.approx(1 + 4e-4) and probe.w.dtype == torch.float32  # the model is untouched
    # The weights the evaluation used were the model's, rounded to fp16 (and held as float32).
    assert seen[-1].dtype == torch.float32 and seen[-1].item() == 1.0


def test_fit_learns_and_is_deterministic(tmp_path):
    data = tiny_data()
    r = default_recipe(epochs=3, batch_size=16, lr=0.05, weight_decay=0, crop_padding=2, mixup_alpha=0.5,
                       label_smoothing=0.1, augment="trivialaugment", augment_group=4)
    m1, m2 = tiny_model(), tiny_model()
    res1 = fit(m1, data, r, live_dir=tmp_path / "live", progress=False)
    res2 = fit(m2, data, r, progress=False)
    assert [h["train_loss"] for h in res1.history] == [h["train_loss"] for h in res2.history]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert res1.history[-1]["train_loss"] < res1.history[0]["train_loss"]
    assert (tmp_path / "live/plots/metrics/train_loss.tsv").read_text().count("\n") == 4  # header + 3 epochs
    assert (tmp_path / "live/plots/metrics/val_acc.tsv").exists()


def test_nan_loss_stops_with_epoch_and_step(tmp_path):
    data = tiny_data()
    r = default_recipe(epochs=2, batch_size=16)
    calls = {"n": 0}

    def bad_loss(logits, targets, labels):
        calls["n"] += 1
        loss = -(targets * torch.log_softmax(logits, 1)).sum(1).mean()
        return loss * float("nan") if calls["n"] == 6 else loss

    message = r"loss is nan at epoch 2, step 2; the last good state is .*state.pt \(epoch 1\)"
    with pytest.raises(SipaError, match=message):
        fit(tiny_model(), data, r, state_path=tmp_path / "state.pt", loss_fn=bad_loss, progress=False)
    assert torch.load(tmp_path / "state.pt", weights_only=True)["epoch"] == 1


def test_bad_recipe_values_name_the_key():
    with pytest.raises(SipaError, match=r"params.yaml: improve.recipe.epochs: must be >= 0, got -1"):
        check_recipe({"epochs": -1}, file="params.yaml", section="improve.recipe")
    with pytest.raises(SipaError, match=r"improve.recipe.lr: must be a number"):
        check_recipe({"lr": "fast"}, file="params.yaml", section="improve.recipe")
    with pytest.raises(SipaError, match=r"did you mean improve.recipe.label_smoothing"):
        check_recipe({"label_smothing": 0.1}, file="params.yaml", section="improve.recipe")


TRAIN_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, sys.argv[3])
    from helpers import tiny_data, tiny_model
    from sipa_core.train import default_recipe, fit
    data = tiny_data(n_train=96)
    r = default_recipe(epochs=5, batch_size=16, lr=0.05, augment="autoaugment", mixup_alpha=1.0, dropout=0.3)
    model = tiny_model()
    slow = float(sys.argv[2])
    fit(model, data, r, state_path=sys.argv[1], after_step=lambda m: time.sleep(slow), progress=False)
    torch.save(model.state_dict(), sys.argv[1] + ".final")
""")


@pytest.mark.slow  # training subprocesses, one killed
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    tests_dir = str(Path(__file__).parent)

    def run(state, slow):
        return [sys.executable, str(script), str(tmp_path / state), str(slow), tests_dir]

    subprocess.run(run("clean.pt", 0), check=True, timeout=300)

    proc = subprocess.Popen(run("killed.pt", 0.05))
    state = tmp_path / "killed.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.exists() and torch.load(state, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.12)  # land inside the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.pt.final").exists()
    killed_at = torch.load(state, weights_only=True)["epoch"]
    assert 2 <= killed_at < 5
    subprocess.run(run("killed.pt", 0), check=True, timeout=300)
    a = torch.load(tmp_path / "clean.pt.final", weights_only=True)
    b = torch.load(tmp_path / "killed.pt.final", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    hist_a = torch.load(tmp_path / "clean.pt", weights_only=True)["history"]
    hist_b = torch.load(state, weights_only=True)["history"]
    assert [h["train_loss"] for h in hist_a] == [h["train_loss"] for h in hist_b]


def test_a_different_run_does_not_resume_a_foreign_state(tmp_path):
    data = tiny_data()
    path = tmp_path / "state.pt"
    fit(tiny_model(), data, default_recipe(epochs=2, batch_size=16), state_path=path, progress=False)
    res = fit(tiny_model(), data, default_recipe(epochs=2, batch_size=16, lr=0.01), state_path=path, progress=False)
    assert res.resumed_from == 0
    done = fit(tiny_model(), data, default_recipe(epochs=2, batch_size=16, lr=0.01), state_path=path, progress=False)
    assert done.resumed_from == 2  # the same run again: nothing left to do
