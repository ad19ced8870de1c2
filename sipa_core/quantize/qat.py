"""Quantization-aware networks with Brevitas: BatchNorm folded, weights per output
channel, activations per tensor, straight-through gradients, any bit width.

Brevitas (AMD/Xilinx, maintained) is chosen over torchao and ``torch.ao``:
it trains at arbitrary widths (4, 6, 8 bits, per layer) with straight-through
estimators and exports the same modules to ONNX as QuantizeLinear /
DequantizeLinear pairs (``onnx_integer.py`` turns them into integer kernels). torchao
targets int4/int8 weight-only inference of large models; ``torch.ao`` is
being retired.

What is quantized: every convolution and linear layer's weight (per output
channel, symmetric, so a pruned zero stays zero) and its input (per tensor),
with the quantizers ``quantizers.py`` chooses, and (``quantize.output_bits``)
its output before the activation, so that onnxruntime runs the layer as one
integer kernel. The elementwise products between them (activation
functions, the SE gate, pooling's division) are not quantized here; they
are counted at 16 bits, and the network is evaluated running them at 16
bits (``train.evaluation.sixteen_bit``). A layer at 16 bits or more stays
floating point.

The module names do not change (a quantized conv is where its float conv
was), so pruning masks, optimizer state names and the per-layer width
patterns of ``scoring.bits.BitWidths`` mean the same thing before and after.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from sipa_core.errors import SipaError
from sipa_core.models.layers import SameConv2d
from sipa_core.quantize.activations import float_activations, observe_outputs, quantize_activations
from sipa_core.quantize.quantizers import Quantizers, brevitas_quantizers, quantization_targets
from sipa_core.quantize.relus import LayerTracer, relu_outputs
from sipa_core.scoring.bits import BitWidths
from sipa_core.train.evaluation import integer_weights

FLOAT_BITS = 16  # a layer at this width or wider is left in floating point
MIN_BITS = 2


def conv_batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, BatchNorm) module names where the BatchNorm reads only that conv's output and nothing
    else reads it: found by tracing the forward with torch.fx (attributes such as torchvision's
    ``conv1`` / ``bn1`` too), or, where the forward cannot be traced, by adjacency in a Sequential."""
    modules = dict(model.named_modules())
    try:
        graph = LayerTracer().trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow: adjacency in Sequentials only
        return [(f"{p}.{a}".lstrip("."), f"{p}.{b}".lstrip(".")) for p, seq in model.named_modules()
                if isinstance(seq, nn.Sequential) for a, b in zip(list(seq._modules), list(seq._modules)[1:])
                if isinstance(seq._modules[a], nn.Conv2d) and isinstance(seq._modules[b], nn.BatchNorm2d)]
    pairs = []
    for node in graph.nodes:
        if node.op == "call_module" and type(modules.get(node.target)) is nn.BatchNorm2d:  # not a BN+act subclass
            source = node.args[0] if node.args else None
            if (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1
                    and isinstance(modules.get(source.target), nn.Conv2d)):
                pairs.append((source.target, node.target))
    return pairs


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that reads a conv's output alone into that conv (which gains a bias);
    the BatchNorm's slot becomes an Identity, so no module name moves. Returns how many were
    folded; a BatchNorm left (after an addition, shared by two convs) is an error naming it."""
    pairs = conv_batchnorm_pairs(model)
    used = [n for pair in pairs for n in pair]
    if len(set(used)) != len(used):  # one module called twice: folding it once would be wrong for the other
        raise SipaError("quantize: a conv or BatchNorm module runs twice in the forward; it cannot be folded")
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        was_training = conv.training
        fused = fuse_conv_bn_eval(conv.eval(), bn.eval()).train(was_training)
        for name, module in ((conv_name, fused), (bn_name, nn.Identity())):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
    left = [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise SipaError(f"quantize: BatchNorm {left[0][0]} ({left[0][1]}) does not follow a conv alone; it "
                        f"cannot be folded")
    return len(pairs)


def _quant_classes():
    import brevitas.nn as qnn  # noqa: PLC0415 (brevitas is heavy)

    class QuantSameConv2d(qnn.QuantConv2d):
        """Brevitas conv with SameConv2d's fixed asymmetric padding (applied before the
        input quantizer: a padded zero is an exact zero at any width)."""

        extra_pad = None

        def forward(self, x):
            if self.extra_pad is not None:
                x = F.pad(x, self.extra_pad)
            return super().forward(x)

    return qnn, QuantSameConv2d


def _quant_twin(module: nn.Module, w_bits: int, a_bits: int, kind: str, weight_scale: str,
                outputs: int | None) -> nn.Module:
    """A Brevitas module computing what ``module`` computes, holding the same tensors."""
    qnn, QuantSameConv2d = _quant_classes()
    q = brevitas_quantizers(w_bits, a_bits, kind, weight_scale, FLOAT_BITS, outputs)
    if isinstance(module, nn.Conv2d):
        cls = QuantSameConv2d if isinstance(module, SameConv2d) else qnn.QuantConv2d
        twin = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                   module.dilation, module.groups, bias=module.bias is not None, **q)
        twin.extra_pad = getattr(module, "extra_pad", None)
    else:
        twin = qnn.QuantLinear(module.in_features, module.out_features, bias=module.bias is not None, **q)
    twin.to(module.weight.device)
    with torch.no_grad():
        twin.weight.copy_(module.weight)
        if module.bias is not None:
            twin.bias.copy_(module.bias)
    return twin.train(module.training)


def check_widths(widths: BitWidths, names) -> None:
    """Every width QAT can train (2..32) and every override naming a layer."""
    for what, bits in [("weight_bits", widths.weight), ("act_bits", widths.act)] + [
            (f"layers {p!r}", min(w, a)) for p, w, a in widths.overrides]:
        if bits < MIN_BITS:
            raise SipaError(f"quantize.{what}: {bits} bits cannot be trained (at least {MIN_BITS})")
    unmatched = widths.unmatched(names)
    if unmatched:
        raise SipaError(f"quantize.layers: {unmatched[0]!r} names no layer of the network")


def quantize_modules(model: nn.Module, widths: BitWidths, quantizers: Quantizers | None = None) -> int:
    """Replace every Conv2d and Linear of ``model`` by its Brevitas twin at the layer's
    widths (``widths.layer(name)``) with its quantizers (default: every input signed,
    weight scales from statistics); with output quantizers (``quantizers.outputs``) every
    swish and squeeze-excitation gate gets its sigmoid quantized too (``activations.py``), and
    a layer whose ReLU takes its output quantizer (``quantizers.relus``, ``relus.py``) has none.
    Run ``fold_batchnorm`` first."""
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise SipaError("quantize: fold BatchNorm before quantizing (fold_batchnorm)")
    quantizers = quantizers or Quantizers()
    targets = quantization_targets(model)
    moved, own = relu_outputs(quantizers.relus, lambda n: max(widths.layer(n)) < FLOAT_BITS, quantizers.kind)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        outputs = None if name in moved else quantizers.outputs
        setattr(parent, child, _quant_twin(module, *widths.layer(name), quantizers.kind(name),
                                           quantizers.weight_scale, outputs))
    if quantizers.outputs is not None:
        quantize_activations(model, own)
    return len(targets)


def is_quantized(model: nn.Module) -> bool:
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer  # noqa: PLC0415 (brevitas is heavy)

    return any(isinstance(m, QuantWeightBiasInputOutputLayer) for m in model.modules())


def quantized_layer_count(model: nn.Module) -> int:
    """Conv and linear layers whose weights and input are both quantized (below 16 bits): the
    layers an integer kernel can run."""
    return sum(1 for m in model.modules() if integer_weights(m) and m.input_quant.is_quant_enabled)


@torch.no_grad()
def calibrate(model: nn.Module, batches, part: nn.Module | None = None) -> None:
    """Set the activation quantizers' scales of ``part`` (default: all of ``model``) from a few
    batches through ``model`` (Brevitas' calibration mode collects statistics and freezes them).
    The rest of the model runs as it is: an exit is calibrated on the quantized network's
    features, and that network's trained scales stay (Brevitas' calibration would overwrite
    the scales of a network loaded from a state dict, so a resumed run would differ)."""
    from brevitas.graph.calibrate import calibration_mode  # noqa: PLC0415 (brevitas is heavy)

    was_training = model.training
    model.eval()
    outputs = observe_outputs(part if part is not None else model)  # the activations' own quantizers
    with calibration_mode(part if part is not None else model):
        for xb in batches:
            model(xb)
    for quant in outputs:
        quant.set_range()
    model.train(was_training)


def float_twin(model: nn.Module) -> nn.Module:
    """A plain-PyTorch copy whose weights are the quantized values (what is stored and
    counted): zeros where the quantized weight is zero. For the scorer."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer  # noqa: PLC0415 (brevitas is heavy)

    twin = copy.deepcopy(model)
    float_activations(twin)
    for name, m in list(twin.named_modules()):
        if not isinstance(m, QuantWeightBiasInputOutputLayer):
            continue
        if isinstance(m, nn.Conv2d):
            plain = SameConv2d.__new__(SameConv2d)  # same name, same padding, no quantizer
            nn.Conv2d.__init__(plain, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                               m.dilation, m.groups, bias=m.bias is not None)
            plain.extra_pad = getattr(m, "extra_pad", None)
        else:
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(m.quant_weight().value if m.weight_quant.is_quant_enabled else m.weight)
            if m.bias is not None:
                plain.bias.copy_(m.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, child, plain.to(m.weight.device))
    return twin.eval()
