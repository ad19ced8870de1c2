"""The sigmoids quantized: swish's gate and the squeeze-excitation gate, so that onnxruntime runs
swish as ``QLinearSigmoid`` and ``QLinearMul`` instead of dequantizing, computing in float and
quantizing again (measured on 96 x 16 x 16 activations: 2.2 times faster at one image, 5 times at
64; docs/results.md).

With output quantizers (``quantize.output_bits``) a conv's result reaches its activation as an
8-bit value. ``QuantSwish`` computes ``x * q(sigmoid(x))`` with ``q`` the sigmoid's range [0, 1]
in 8 unsigned bits (``GateQuant``, at any ``output_bits``); the product is quantized by the next
layer's input quantizer, so onnxruntime's QDQ selectors find ``DQ -> Sigmoid -> Q`` and ``DQ, DQ -> Mul -> Q``. The
squeeze-excitation gate gets the same quantizer (``QuantSqueezeExcite``). Both are trained with
the network (what runs is what is trained). Counting: the gate's quantization adds no counted
operation (as for every quantizer); the elementwise products stay counted at 16 bits.

The module names do not change: a quantized activation or SE block sits where its float one was.
"""

from __future__ import annotations

import torch
from torch import nn

from sipa_core.models.layers import SqueezeExcite


GATE_LEVELS = 255  # the sigmoid's [0, 1] in 8 unsigned bits: scale 1/255, zero point 0


class GateQuant(nn.Module):
    """A sigmoid's output quantized to 8 unsigned bits over its whole range [0, 1] (scale 1/255, zero
    point 0: fixed, nothing to calibrate or learn); straight-through gradient. Exports to ONNX as
    QuantizeLinear / DequantizeLinear."""

    def forward(self, x):
        return torch.fake_quantize_per_tensor_affine(x, 1.0 / GATE_LEVELS, 0, 0, GATE_LEVELS)


class QuantSwish(nn.Module):
    """swish(x) = x * sigmoid(x), the sigmoid quantized (``GateQuant``)."""

    def __init__(self):
        super().__init__()
        self.gate_quant = GateQuant()

    def forward(self, x):
        return x * self.gate_quant(torch.sigmoid(x))


class QuantSqueezeExcite(SqueezeExcite):
    """``SqueezeExcite`` with its sigmoid gate quantized (``GateQuant``)."""

    def __init__(self, se: SqueezeExcite):
        nn.Module.__init__(self)
        self.reduce, self.act, self.expand = se.reduce, se.act, se.expand
        self.gate_quant = GateQuant()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate_quant(torch.sigmoid(self.expand(self.act(self.reduce(s)))))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_activations(model: nn.Module) -> int:
    """Every swish (``nn.SiLU``) and squeeze-excitation block of ``model`` with its sigmoid quantized;
    returns how many. Run after the conv layers are quantized (the SE's convs stay as they are)."""
    blocks = [(n, m) for n, m in model.named_modules() if type(m) is SqueezeExcite]
    for name, se in blocks:  # first the blocks, then every swish (inside them too)
        _replace(model, name, QuantSqueezeExcite(se))
    swishes = [n for n, m in model.named_modules() if type(m) is nn.SiLU]
    for name in swishes:
        _replace(model, name, QuantSwish())
    return len(blocks) + len(swishes)


def float_activations(model: nn.Module) -> None:
    """The inverse, for the scorer's float twin: plain swish and SE blocks (the same arithmetic
    without the quantizers, which are not counted)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantSwish):
            _replace(model, name, nn.SiLU())
        elif isinstance(m, QuantSqueezeExcite):
            plain = SqueezeExcite.__new__(SqueezeExcite)
            nn.Module.__init__(plain)
            plain.reduce, plain.act, plain.expand = m.reduce, m.act, m.expand
            _replace(model, name, plain)
