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


class OutputQuant(nn.Module):
    """An activation's output in 8 unsigned bits with a zero point, its range set once from the
    calibration batches (the 0.01st to the 99.99th percentile of the values, zero inside it) and
    then fixed: a learned scale (LSQ with the recipe's learning rate) diverged in QAT on the CIFAR-100
    profile's network. Straight-through gradient inside the range. Exports to ONNX as
    QuantizeLinear / DequantizeLinear."""

    LEVELS = 255
    TAIL = 1e-4  # the share of values left outside the range at each end
    SAMPLE = 1_000_000  # values of a batch the percentiles are taken from, at most

    def __init__(self):
        super().__init__()
        self.register_buffer("act_scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self.observed: list[float] | None = None  # [low, high] while calibrating

    def forward(self, x):
        if self.observed is not None:
            self._observe(x)
            return x
        return torch.fake_quantize_per_tensor_affine(x, float(self.act_scale), int(self.zero_point), 0, self.LEVELS)

    @torch.no_grad()
    def _observe(self, x) -> None:
        values = x.detach().flatten().float()
        values = values[::len(values) // self.SAMPLE + 1]
        low, high = torch.quantile(values, torch.tensor([self.TAIL, 1 - self.TAIL], device=values.device)).tolist()
        self.observed = [min(self.observed[0], low), max(self.observed[1], high)]

    @torch.no_grad()
    def set_range(self) -> None:
        """Scale and zero point from the observed range (zero inside it), and stop observing."""
        low, high = min(self.observed[0], 0.0), max(self.observed[1], 0.0)
        scale = max(high - low, 1e-8) / self.LEVELS
        self.act_scale.fill_(scale)
        self.zero_point.fill_(min(self.LEVELS, max(0, round(-low / scale))))
        self.observed = None


class QuantSwish(nn.Module):
    """swish(x) = x * sigmoid(x), the sigmoid quantized (``GateQuant``), and the product too where
    ``output_quant`` (where it feeds more than one layer: an SE block's pooling and gate, the head's
    pooling)."""

    def __init__(self, output_quant: bool = False):
        super().__init__()
        self.gate_quant = GateQuant()
        self.output_quant = OutputQuant() if output_quant else None

    def forward(self, x):
        y = x * self.gate_quant(torch.sigmoid(x))
        return y if self.output_quant is None else self.output_quant(y)


class QuantReLU(nn.ReLU):
    """A ReLU with its output in 8 unsigned bits (``OutputQuant``; zero point 0, the range starting at
    0), where it takes the output quantizer of the layer before it (``relus.py``)."""

    def __init__(self):
        super().__init__()
        self.output_quant = OutputQuant()

    def forward(self, x):
        return self.output_quant(torch.relu(x))


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


def quantize_activations(model: nn.Module, relus=()) -> int:
    """Every swish (``nn.SiLU``) and squeeze-excitation block of ``model`` with its sigmoid quantized,
    and each ReLU named in ``relus`` with its output quantized (``QuantReLU``); returns how many. Run
    after the conv layers are quantized (the SE's convs stay as they are)."""
    blocks = [(n, m) for n, m in model.named_modules() if type(m) is SqueezeExcite]
    for name, se in blocks:  # first the blocks, then every swish (inside them too)
        _replace(model, name, QuantSqueezeExcite(se))
    shared = _shared_swishes(model)
    swishes = [n for n, m in model.named_modules() if type(m) is nn.SiLU]
    for name in swishes:
        _replace(model, name, QuantSwish(output_quant=name in shared))
    for name in relus:
        _replace(model, name, QuantReLU())
    if swishes or relus:
        model.to(next(model.parameters()).device)
    return len(blocks) + len(swishes) + len(relus)


def _shared_swishes(model: nn.Module) -> set[str]:
    """Swishes whose product feeds more than one layer, in the EfficientNet family's blocks: the
    depthwise conv's swish in a block with SE (pooled and gated) and the head's (pooled)."""
    out = set()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if getattr(m, "se", None) is not None and isinstance(getattr(m, "depthwise", None), nn.Sequential):
            out.add(f"{prefix}depthwise.{len(m.depthwise) - 1}")
        if name == "" and isinstance(getattr(m, "head", None), nn.Sequential):
            out.add(f"head.{len(m.head) - 1}")
    return out


def observe_outputs(part: nn.Module) -> list[OutputQuant]:
    """Start observing the range of every ``OutputQuant`` of ``part`` (``set_range`` ends it)."""
    quants = [m for m in part.modules() if isinstance(m, OutputQuant)]
    for q in quants:
        q.observed = [float("inf"), float("-inf")]
    return quants


def float_activations(model: nn.Module) -> None:
    """The inverse, for the scorer's float twin: plain swish, ReLU and SE blocks (the same arithmetic
    without the quantizers, which are not counted)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantSwish):
            _replace(model, name, nn.SiLU())
        elif isinstance(m, QuantReLU):
            _replace(model, name, nn.ReLU())
        elif isinstance(m, QuantSqueezeExcite):
            plain = SqueezeExcite.__new__(SqueezeExcite)
            nn.Module.__init__(plain)
            plain.reduce, plain.act, plain.expand = m.reduce, m.act, m.expand
            _replace(model, name, plain)
