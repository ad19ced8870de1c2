"""Which Brevitas quantizer each layer gets, beyond its widths (asymmetric inputs after swish:
LSQ+, Bhalgat et al. 2020).

Activations (the input of every conv and linear layer, per tensor):

* ``fitted`` (the default): chosen per layer from the range its input takes on
  the calibration batches of the floating-point network: ``unsigned``
  (``Uint8ActPerTensorFloat``) where it is never negative (after a ReLU),
  ``shifted`` (``ShiftedUint8ActPerTensorFloat``: unsigned with a learned
  zero point, an asymmetric range) where the negative side is less than half
  of the positive one (swish outputs, about [-0.28, inf): a signed quantizer
  would leave half its levels almost unused), ``signed``
  (``Int8ActPerTensorFloat``) otherwise (normalised images, block inputs).
* ``signed``: every input signed, as before this option existed.

Scales of activation quantizers are learned parameters in Brevitas, initialised
from statistics by ``calibrate``. Weights (per output channel, symmetric, so a
pruned zero stays zero): ``stats`` recomputes each scale from max |w| at every
step (``Int8WeightPerChannelFloat``); ``learned`` trains the scale, initialised
by minimising the quantization MSE (``Int8WeightPerChannelFloatMSE``, LSQ).

Outputs (``Quantizers.outputs``, the ``quantize.output_bits`` parameter; 8 by default): every
integer layer's output, the conv or linear result with its folded BatchNorm bias before the
activation, quantized per tensor, signed (``Int8ActPerTensorFloat``). onnxruntime runs a layer as
one integer kernel (``QLinearConv``, with its depthwise kernels, or ``QGemm``) only when a
QuantizeLinear follows its output (its QDQ selectors); without it the layer runs as
``ConvInteger`` with float arithmetic around it (``onnx_integer.py``). Trained with the network,
so that what QAT trains is what the integer graph computes. Counting: the requantization of an
output element is the per-channel scale multiplication the adder-tree accounting already counts;
the elementwise operations after it stay counted at 16 bits.

Counting: a layer whose input is unsigned or shifted has operands of
weight + activation bits in the adder tree (signed: one bit less); a shifted
input's zero point is folded into the layer's bias (sum of w x (q - z) =
sum of w x q - z x sum of w, the last term a constant per output channel), so
it adds no operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from sipa_core.errors import SipaError
from sipa_core.models.layers import SameConv2d

ACT_QUANTIZERS = ("fitted", "signed")
WEIGHT_SCALES = ("stats", "learned")
INPUT_KINDS = ("signed", "unsigned", "shifted")
ASYMMETRY = 0.5  # shifted when the smaller side of the input range is below this share of the larger


def input_kind(low: float, high: float) -> str:
    """The quantizer that fits an input ranging over [low, high]."""
    if low >= 0:
        return "unsigned"
    if high > 0 and -low < ASYMMETRY * high:
        return "shifted"
    return "signed"


QUANTIZABLE = (nn.Conv2d, SameConv2d, nn.Linear)


def quantization_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers QAT replaces by quantized twins, by name (exact types: a
    Brevitas layer, itself a subclass of Conv2d or Linear, is not one). Another subclass of Conv2d
    or Linear (its own forward: a twin would drop it) is an error naming it, not a float layer."""
    odd = [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
           and type(m) not in QUANTIZABLE and not hasattr(m, "weight_quant")]
    if odd:
        raise SipaError(f"quantize: layer {odd[0][0]} is a {odd[0][1]}, a subclass of Conv2d / Linear with its "
                        f"own forward that has no quantized twin; build the network with plain nn.Conv2d / "
                        f"nn.Linear layers")
    return [(n, m) for n, m in model.named_modules() if type(m) in QUANTIZABLE]


@torch.no_grad()
def input_ranges(model: nn.Module, batches, part: nn.Module | None = None) -> dict[str, tuple[float, float]]:
    """(min, max) of every conv / linear input of ``part`` (default: ``model``) over ``batches``
    run through ``model`` in evaluation mode; names relative to ``part``."""
    part = part if part is not None else model
    ranges: dict[str, list[float]] = {}

    def hook(name):
        def record(_module, args):
            x = args[0]
            low, high = float(x.min()), float(x.max())
            old = ranges.setdefault(name, [low, high])
            old[0], old[1] = min(old[0], low), max(old[1], high)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in quantization_targets(part)]
    was_training = model.training
    model.eval()
    try:
        for xb in batches:
            model(xb)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (lo, hi) for n, (lo, hi) in ranges.items()}


class FusedRelu(NamedTuple):
    """A ReLU that takes the output quantizer of the layer it reads (``relus.py``)."""

    relu: str
    layer: str  # the conv or linear layer whose output the ReLU reads alone
    reader: str | None  # the one layer that reads the ReLU (None: something else does)


@dataclass(frozen=True)
class Quantizers:
    """The quantizer choice of one network (main or exit): each layer's input kind, whether
    weight scales are learned, the outputs' width, and the ReLUs that take their layer's output
    quantizer."""

    inputs: dict = field(default_factory=dict)  # layer name -> INPUT_KINDS (absent: signed)
    weight_scale: str = "stats"
    outputs: int | None = None  # width of every integer layer's output quantizer (None: float outputs)
    relus: tuple = ()  # FusedRelu each (empty: every output quantized before its activation)

    def kind(self, name: str) -> str:
        return self.inputs.get(name, "signed")

    def unsigned(self) -> tuple[str, ...]:
        """Layers whose integer input is unsigned (the adder tree counts one operand bit more)."""
        return tuple(sorted(n for n, k in self.inputs.items() if k != "signed"))

    def as_record(self) -> dict:
        return {"inputs": dict(sorted(self.inputs.items())), "weight_scale": self.weight_scale,
                "outputs": self.outputs, **({"relus": [list(r) for r in self.relus]} if self.relus else {})}

    @classmethod
    def from_record(cls, record: dict | None) -> Quantizers:
        """A checkpoint's record (absent in checkpoints older than this option: every input signed;
        ``outputs`` absent in those older than output quantizers: float outputs; ``relus`` absent in
        those older than ReLU fusion: none)."""
        if not record:
            return cls()
        inputs, scale = dict(record.get("inputs", {})), record.get("weight_scale", "stats")
        outputs, relus = record.get("outputs"), record.get("relus", [])
        bad = [k for k in inputs.values() if k not in INPUT_KINDS]
        if bad or scale not in WEIGHT_SCALES or not (outputs is None or isinstance(outputs, int)):
            raise SipaError(f"malformed quantizer record (input kind {bad[:1]} / weight scale {scale!r} / "
                            f"outputs {outputs!r})")
        if not all(isinstance(r, list) and len(r) == 3 for r in relus):
            raise SipaError(f"malformed quantizer record (relus {relus!r:.60})")
        return cls(inputs, scale, outputs, tuple(FusedRelu(*r) for r in relus))


def fitted_quantizers(model: nn.Module, batches, act: str, weight_scale: str,
                      part: nn.Module | None = None, outputs: int | None = None) -> Quantizers:
    """The quantizers of ``part``'s layers (``act``: ``fitted`` from their input ranges, or ``signed``;
    ``outputs``: the width of their output quantizers, None for float outputs)."""
    if act not in ACT_QUANTIZERS:
        raise SipaError(f"activation quantizers must be one of {', '.join(ACT_QUANTIZERS)}, got {act!r}")
    if act == "signed":
        return Quantizers({}, weight_scale, outputs)
    kinds = {n: input_kind(lo, hi) for n, (lo, hi) in input_ranges(model, batches, part).items()}
    return Quantizers({n: k for n, k in kinds.items() if k != "signed"}, weight_scale, outputs)


def brevitas_quantizers(w_bits: int, a_bits: int, kind: str, weight_scale: str, float_bits: int,
                        output_bits: int | None = None) -> dict:
    """Keyword arguments of a Brevitas layer at these widths (a width >= ``float_bits``: no quantizer;
    an output quantizer at ``output_bits`` on a layer whose weights and input are both integer)."""
    from brevitas.quant import (  # noqa: PLC0415 (brevitas is heavy)
        Int8ActPerTensorFloat,
        Int8WeightPerChannelFloat,
        Int8WeightPerChannelFloatMSE,
        ShiftedUint8ActPerTensorFloat,
        Uint8ActPerTensorFloat,
    )

    weight = {"stats": Int8WeightPerChannelFloat, "learned": Int8WeightPerChannelFloatMSE}[weight_scale]
    act = {"signed": Int8ActPerTensorFloat, "unsigned": Uint8ActPerTensorFloat,
           "shifted": ShiftedUint8ActPerTensorFloat}[kind]
    kw = dict(weight_quant=weight, weight_bit_width=w_bits) if w_bits < float_bits else dict(weight_quant=None)
    if a_bits < float_bits:
        kw.update(input_quant=act, input_bit_width=a_bits)
    if output_bits is not None and output_bits < float_bits and w_bits < float_bits and a_bits < float_bits:
        kw.update(output_quant=Int8ActPerTensorFloat, output_bit_width=output_bits)
    return kw


def is_quantizer_parameter(name: str) -> bool:
    """A Brevitas scale or zero point (trained at its own learning rate, without weight decay)."""
    return name.endswith(("scaling_impl.value", "zero_point_impl.value"))


@torch.no_grad()
def init_weight_scales(model: nn.Module) -> None:
    """Initialise learned weight scales now (Brevitas does it on the first training-mode
    quantization): a network evaluated before any training step must not use the placeholder."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer  # noqa: PLC0415 (brevitas is heavy)

    for m in model.modules():
        if isinstance(m, QuantWeightBiasInputOutputLayer) and m.weight_quant.is_quant_enabled:
            was_training = m.training
            m.train()
            m.quant_weight()
            m.train(was_training)
