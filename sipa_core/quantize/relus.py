"""ReLUs folded into the integer layer before them (``quantize.fuse_relu``).

With output quantizers (``quantize.output_bits``) an integer layer's result is quantized before its
activation, and in a ReLU network the ReLU then runs in float between a DequantizeLinear and the
next QuantizeLinear: two conversions and a float pass over the tensor for every ReLU. onnxruntime
removes a ReLU whose only reader is a QuantizeLinear with zero point 0 on uint8 (``ReluQuantFusion``,
onnxruntime ``core/optimizer/qdq_transformer/relu_quantizelinear.cc``): unsigned quantization with
zero point 0 saturates at zero what the ReLU clips. So where a ReLU reads a conv or linear layer's
output alone (its BatchNorm folded), that layer's output quantizer moves after the ReLU:

* the ReLU's one reader is an integer layer with an unsigned input quantizer (zero point 0; every
  ReLU-fed input under ``act_quantizers: fitted``): that input quantizer quantizes it and the
  layer before has no output quantizer, so ``Conv -> Relu -> Q`` runs as one ``QLinearConv``
  writing the next layer's input;
* otherwise (a ReLU read by pooling and a product, as in a squeeze-excitation block, or by more
  than one layer): the ReLU gets its own unsigned 8-bit output quantizer (``OutputQuant``, its
  range from calibration, zero point 0 as the range starts at 0), which the ReLU's readers share.

What QAT trains is what runs: the layer's accumulator requantized once, to an unsigned scale, its
negative side saturating at zero. A ReLU module called more than once (torchvision's ResNet blocks
reuse one) and a ReLU after an addition keep the quantizer before them.
"""

from __future__ import annotations

import collections

import torch
from torch import nn

from sipa_core.quantize.quantizers import QUANTIZABLE, FusedRelu


class LayerTracer(torch.fx.Tracer):
    """Every conv, linear and BatchNorm is one call, subclasses (SameConv2d) included."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def why_not_fused(cfg: dict) -> str | None:
    """Why the quantize section's settings leave ``fuse_relu`` without effect; None where it applies."""
    if cfg["output_bits"] is None:
        return "output_bits is null (no output quantizer to move)"
    if cfg["act_quantizers"] != "fitted":
        return "act_quantizers is signed (onnxruntime folds a ReLU only into an unsigned quantizer)"
    return None


def fusable_relus(module: nn.Module) -> tuple[FusedRelu, ...]:
    """The ReLUs of ``module`` that read a conv or linear layer's output alone, each with that layer
    and the one layer reading the ReLU (None where something else reads it); none where the forward
    cannot be traced."""
    modules = dict(module.named_modules())
    try:
        graph = LayerTracer().trace(module)
    except Exception:  # noqa: BLE001 - data-dependent control flow: the quantizers stay before the ReLUs
        return ()
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")

    def layer(node) -> str | None:  # a quantizable layer called once, or None
        ok = (isinstance(node, torch.fx.Node) and node.op == "call_module"
              and type(modules.get(node.target)) in QUANTIZABLE and calls[node.target] == 1)
        return node.target if ok else None

    found = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.ReLU or calls[node.target] != 1:
            continue
        source = layer(_through_norms(node.args[0], modules))
        if source is not None:
            readers = list(node.users)
            found.append(FusedRelu(node.target, source, layer(readers[0]) if len(readers) == 1 else None))
    return tuple(found)


def _through_norms(node, modules: dict):
    """The node producing ``node``'s value through BatchNorm or Identity modules, each read by the next
    alone; None where the chain branches."""
    while isinstance(node, torch.fx.Node) and len(node.users) == 1:
        if node.op == "call_module" and type(modules.get(node.target)) in (nn.BatchNorm2d, nn.Identity):
            node = node.args[0]
            continue
        return node
    return None


def relu_outputs(relus, integer, kind) -> tuple[set[str], set[str]]:
    """At given widths: (the layers whose output quantizer moves after their ReLU, the ReLUs that get
    their own output quantizer). ``integer(name)``: the layer runs in integers at these widths;
    ``kind(name)``: its input quantizer's kind."""
    moved, own = set(), set()
    for relu, source, reader in relus:
        if not integer(source):
            continue
        moved.add(source)
        if reader is None or not integer(reader) or kind(reader) != "unsigned":
            own.add(relu)
    return moved, own
