"""Counting below 16 bits by the MicroNet rules, checked against figures derived here
from the layer shapes of sipa_baseline (forward hooks give each layer's output shape;
the arithmetic below is written from the rules, not taken from the counter)."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from sipa_core.errors import SipaError
from sipa_core.models import create_model
from sipa_core.models.efficientnet import MBConv
from sipa_core.models.layers import SqueezeExcite
from sipa_core.scoring import REFERENCE_BYTES, REFERENCE_OPS, BitWidths, count


@pytest.fixture(scope="module")
def shapes():
    """Per module: (kind, module name, details) from one forward pass of sipa_baseline."""
    model = create_model("sipa_baseline").eval()
    rows, handles = [], []

    def hook(name):
        def record(mod, inp, out):
            rows.append((name, mod, tuple(inp[0].shape), tuple(out.shape)))
        return record

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_hook(hook(name)))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return model, rows


def by_hand(model, rows, w_bits, a_bits, density=1.0, layer=lambda name: None, elementwise=None):
    """(params bytes, 32-bit-equivalent ops) from the rules. ``layer(name)`` -> (W, A) override or None;
    ``elementwise``: the width of the products without a weight, when not the activation width."""
    def widths(name):
        return layer(name) or (w_bits, a_bits)

    params_bits, mult_cost, adds = 0.0, 0.0, 0.0
    for name, mod, shape_in, shape_out in rows:
        w, a = widths(name)
        n_out = torch.Size(shape_out).numel()
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            fan = mod.weight[0].numel()  # in_channels / groups * kh * kw, or in_features
            numel = mod.weight.numel()
            params_bits += numel * density * w + (numel if density < 1 else 0)  # values + 1-bit mask
            mult_cost += n_out * fan * density * max(w, a)
            adds += n_out * (fan * density - 1)
            if mod.bias is not None:
                params_bits += mod.bias.numel() * w
                adds += n_out
        elif isinstance(mod, nn.BatchNorm2d):  # folded into the bias-free conv before it
            params_bits += mod.num_features * w
            adds += n_out
        elif isinstance(mod, nn.SiLU):
            mult_cost += 3 * n_out * (elementwise or a)
            adds += n_out
        elif isinstance(mod, SqueezeExcite):
            c, hw = shape_in[1], shape_in[2] * shape_in[3]
            e = elementwise or a
            mult_cost += c * e + 2 * c * e + n_out * e  # mean's division, sigmoid gate, x * gate
            adds += c * (hw - 1) + c  # mean's sums, sigmoid's addition
        elif isinstance(mod, MBConv) and mod.residual:
            adds += n_out
        elif name == "head":  # the global average pool after the head
            c, hw = shape_out[1], shape_out[2] * shape_out[3]
            _, a_root = widths("")
            mult_cost += c * (elementwise or a_root)
            adds += c * (hw - 1)
    return params_bits / 8, mult_cost / 32 + adds


def test_derivation_reproduces_the_16_bit_freebie(shapes):
    model, rows = shapes
    params_bytes, ops = by_hand(model, rows, 16, 16)
    s = count(model, (3, 32, 32), bits=16).summary()
    assert params_bytes == s["params_bytes"] == 476_984 * 2
    assert ops == pytest.approx(s["ops"], abs=0.01) and ops == pytest.approx(60_456_692 / 2 + 58_230_372)


@pytest.mark.parametrize("w, a, sparsity", [(8, 8, 0.0), (4, 4, 0.0), (8, 8, 0.64), (4, 4, 0.64), (4, 8, 0.0)])
def test_weights_and_activations_below_16_bits(shapes, w, a, sparsity):
    model, rows = shapes
    params_bytes, ops = by_hand(model, rows, w, a, density=1 - sparsity)
    s = count(model, (3, 32, 32), bits=BitWidths(w, a), uniform_sparsity=sparsity or None).summary()
    assert s["params_bytes"] == pytest.approx(params_bytes, rel=1e-9)
    assert s["ops"] == pytest.approx(ops, rel=1e-9)
    assert s["score"] == pytest.approx(params_bytes / REFERENCE_BYTES + ops / REFERENCE_OPS, rel=1e-9)
    assert (s["weight_bits"], s["act_bits"], s["add_bits"]) == (w, a, 32)


def test_dense_w8a8_and_w4a4_figures(shapes):
    """The figures themselves: 476,984 values at 8 and 4 bits; multiplies at a quarter and an
    eighth of their 32-bit cost, additions at 32 bits."""
    model, _ = shapes
    w8 = count(model, (3, 32, 32), bits=BitWidths(8, 8)).summary()
    w4 = count(model, (3, 32, 32), bits=BitWidths(4, 4)).summary()
    assert w8["params_bytes"] == 476_984 and w4["params_bytes"] == 476_984 / 2
    assert w8["ops"] == pytest.approx(60_456_692 / 4 + 58_230_372)
    assert w4["ops"] == pytest.approx(60_456_692 / 8 + 58_230_372)
    narrow = count(model, (3, 32, 32), bits=BitWidths(4, 4, add=16)).summary()
    assert narrow["ops"] == pytest.approx(60_456_692 / 8 + 58_230_372 / 2)


def test_per_layer_overrides(shapes):
    """Stem and classifier at 8 bits, the rest W4A4: their values, multiplies and activations at 8."""
    model, rows = shapes
    eight = {"stem", "classifier"}

    def layer(name):
        return (8, 8) if name.split(".")[0] in eight else None

    params_bytes, ops = by_hand(model, rows, 4, 4, layer=layer)
    s = count(model, (3, 32, 32), bits=BitWidths(4, 4, overrides=(("stem", 8, 8), ("classifier", 8, 8))))
    assert s["params_bytes"] == pytest.approx(params_bytes, rel=1e-9)
    assert s["ops"] == pytest.approx(ops, rel=1e-9)


def test_bad_widths_are_errors():
    with pytest.raises(SipaError, match="weight bits must be an integer from 1 to 32, got 0"):
        BitWidths(0, 8)
    with pytest.raises(SipaError, match="activation bits of 'stem' must be an integer from 1 to 32"):
        BitWidths(4, 4, overrides=(("stem", 8, 64),))
    assert BitWidths(4, 4, overrides=(("stemm", 8, 8),)).unmatched(["stem", "stem.0"]) == ["stemm"]


@pytest.mark.slow  # CLI subprocesses
def test_sipa_score_estimates_a_quantized_network(shapes):
    model, _ = shapes
    args = [sys.executable, "-m", "sipa_core.cli", "score", "--arch", "sipa_baseline", "--weight-bits", "4",
            "--act-bits", "4", "--layer-bits", "stem=8", "--layer-bits", "classifier=8:8", "--json"]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    expected = count(model, (3, 32, 32), bits=BitWidths(4, 4, overrides=(("stem", 8, 8), ("classifier", 8, 8))))
    assert json.loads(out.stdout)["score"] == pytest.approx(expected["score"])
    for bad, message in ((["--layer-bits", "stemm=8"], "--layer-bits 'stemm' matches no module"),
                         (["--weight-bits", "33"], "weight bits must be an integer from 1 to 32, got 33"),
                         (["--layer-bits", "stem"], "expected PATTERN=W or PATTERN=W:A")):
        out = subprocess.run(args[:6] + bad, capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_elementwise_products_at_their_own_width(shapes):
    """The quantizing stage quantizes conv/linear inputs only: its elementwise products
    (swish, SE gate, pooling) are counted at 16 bits beside W4A4 layers."""
    model, rows = shapes
    params_bytes, ops = by_hand(model, rows, 4, 4, elementwise=16)
    s = count(model, (3, 32, 32), bits=BitWidths(4, 4, 32, (), 16)).summary()
    assert params_bytes == s["params_bytes"] and ops == pytest.approx(s["ops"], abs=0.01)
    plain = count(model, (3, 32, 32), bits=BitWidths(4, 4)).summary()
    assert s["ops"] > plain["ops"] and s["params_bytes"] == plain["params_bytes"]
    assert BitWidths(4, 4, 32, (), 16).label() == "W4A4, elementwise 16"
    with pytest.raises(SipaError, match="elementwise product bits"):
        BitWidths(4, 4, 32, (), 40)
