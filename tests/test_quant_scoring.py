"""Counting below 16 bits by the MicroNet rules, checked against figures derived here
from the layer shapes of sipa_baseline (forward hooks give each layer's output shape;
the arithmetic below is written from the rules, not taken from the counter)."""

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from sipa_core.cli import main
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


# The adder-tree accounting (the 2019 winner's public counter, flops_utils_final.py), derived here
# from the rule: operands of w + a - 1 bits (signed activations); a pair of operands is added at the
# wider one's width and the sum is one bit wider; an odd operand waits for the next level.
def adder_tree(n: int, b0: int) -> int:
    widths, total = [b0] * n, 0
    while len(widths) > 1:
        paired = [max(x, y) for x, y in zip(widths[::2], widths[1::2])]
        total += sum(paired)
        widths = [w + 1 for w in paired] + (widths[-1:] if len(widths) % 2 else [])
    return total


def fixed_integer(n: int, b0: int) -> int:
    """n - 1 additions at the width that holds any sum of n operands of b0 bits."""
    return (n - 1) * (b0 + (n - 1).bit_length()) if n > 1 else 0


def per_output(cost, n: float, b0: int) -> float:
    """An average kernel of n nonzeros (uniform sparsity): between the two whole counts around it."""
    low, f = int(n), n - int(n)
    return (1 - f) * cost(low, b0) + f * cost(low + 1, b0)


def test_the_adder_tree_by_hand():
    # 27 operands of 7 bits (a 3x3x3 kernel, W4A4): 13 adds at 7, 7 at 8, 3 at 9, 2 at 10, 1 at 11
    assert adder_tree(27, 7) == 13 * 7 + 7 * 8 + 3 * 9 + 2 * 10 + 1 * 11 == 205
    assert fixed_integer(27, 7) == 26 * 12  # 27 values of 7 bits need 12
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(256, 10))
    s = count(model, (3, 8, 8), bits=BitWidths(4, 4)).summary()
    conv = 256 * (adder_tree(27, 7) + 27 * 4 + 16)  # per output: its tree, 27 mults at 4 bits, its scale
    linear = 10 * (adder_tree(256, 7) + 256 * 4 + 16 + 16)  # ... and the bias at 16 bits
    assert s["ops_tree"] == (conv + linear) / 32
    assert s["score"] > s["score_tree"]  # the strict accounting: every addition at 32 bits
    # The linear layer's input unsigned (after a ReLU, or shifted by a zero point): its operands
    # are 4 + 4 = 8 bits wide, the conv's stay at 7; the strict accounting does not change.
    u = count(model, (3, 8, 8), bits=BitWidths(4, 4, unsigned=("2",))).summary()
    assert adder_tree(256, 8) == adder_tree(256, 7) + 255
    assert u["ops_tree"] == (conv + 10 * (adder_tree(256, 8) + 256 * 4 + 32)) / 32 and u["ops"] == s["ops"]


def by_hand_tree(rows, w_bits, a_bits, density=1.0, cost=adder_tree):
    """32-bit-equivalent ops of sipa_baseline under the int / tree accounting, from the rule: each
    conv/linear output's accumulation, its multiplies and its per-channel scale (16 bits); every other
    addition at 16 bits (FP16); elementwise products at the activation width."""
    bits = 0.0
    b0 = w_bits + a_bits - 1
    for name, mod, shape_in, shape_out in rows:
        n_out = torch.Size(shape_out).numel()
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            n = mod.weight[0].numel() * density
            bits += n_out * (per_output(cost, n, b0) + n * max(w_bits, a_bits) + 16)
            bits += n_out * 16 if mod.bias is not None else 0
        elif isinstance(mod, nn.BatchNorm2d):
            bits += n_out * 16
        elif isinstance(mod, nn.SiLU):
            bits += 3 * n_out * a_bits + n_out * 16
        elif isinstance(mod, SqueezeExcite):
            c, hw = shape_in[1], shape_in[2] * shape_in[3]
            bits += (c + 2 * c + n_out) * a_bits + (c * (hw - 1) + c) * 16
        elif isinstance(mod, MBConv) and mod.residual:
            bits += n_out * 16
        elif name == "head":
            c, hw = shape_out[1], shape_out[2] * shape_out[3]
            bits += c * a_bits + c * (hw - 1) * 16
    return bits / 32


@pytest.mark.parametrize("w, a, sparsity", [(4, 4, 0.64), (4, 4, 0.0), (8, 8, 0.0), (4, 8, 0.64)])
@pytest.mark.parametrize("add, cost", [("tree", adder_tree), ("int", fixed_integer)])
def test_int_and_tree_accountings_of_sipa_baseline(shapes, w, a, sparsity, add, cost):
    model, rows = shapes
    ops = by_hand_tree(rows, w, a, 1 - sparsity, cost)
    widths = BitWidths(w, a, add)
    s = count(model, (3, 32, 32), bits=widths, uniform_sparsity=sparsity or None).summary()
    assert s["ops"] == pytest.approx(ops, rel=1e-9)
    params_bytes, strict = by_hand(model, rows, w, a, density=1 - sparsity)
    assert s["params_bytes"] == pytest.approx(params_bytes, rel=1e-9)  # parameters are counted alike
    assert s["score"] == pytest.approx(params_bytes / REFERENCE_BYTES + ops / REFERENCE_OPS, rel=1e-9)
    strict_count = count(model, (3, 32, 32), bits=BitWidths(w, a), uniform_sparsity=sparsity or None).summary()
    assert strict_count["ops"] == pytest.approx(strict, rel=1e-9)  # the strict key stays the strict one
    if add == "tree":
        assert strict_count["ops_tree"] == pytest.approx(ops, rel=1e-9)  # ... with the tree beside it


def test_a_sparse_kernel_accumulates_over_its_own_nonzeros():
    """Real sparsity: each output channel's tree runs over that channel's nonzero weights."""
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight.view(3, -1)[0, :2] = 1.0   # channel 0: 2 nonzeros
        conv.weight.view(3, -1)[1, :5] = 1.0   # channel 1: 5
        conv.weight.view(3, -1)[2, :1] = 1.0   # channel 2: 1 (no addition)
    s = count(conv, (2, 4, 4), bits=BitWidths(4, 4)).summary()
    per_pixel = adder_tree(2, 7) + adder_tree(5, 7) + adder_tree(1, 7) + (2 + 5 + 1) * 4 + 3 * 16
    assert adder_tree(1, 7) == 0 and s["ops_tree"] == 16 * per_pixel / 32
    assert s["weight_sparsity"] == pytest.approx(1 - 8 / 54)


def test_the_papers_final_network_under_both_accountings():
    """sipa_baseline 64% sparse with the exit after block 4 at ratio 0.3217 (the paper's final
    network), W4A4: the figures docs/scoring.md gives, from `sipa score ... --json`."""
    args = ["score", "--arch", "sipa_baseline", "--uniform-sparsity", "0.64", "--exit-after", "4",
            "--exit-ratio", "0.3217", "--weight-bits", "4", "--act-bits", "4", "--json"]
    strict, tree = (json.loads(_sipa(args + ["--add-bits", add])) for add in ("32", "tree"))
    assert strict["score_tree"] == pytest.approx(tree["score"]) and tree["score"] < strict["score"]
    assert strict["params_score"] == tree["params_score"] and strict["ops_score_tree"] == tree["ops_score"]


def _sipa(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    return out.getvalue()
