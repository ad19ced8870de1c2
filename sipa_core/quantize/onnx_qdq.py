"""The quantized network's ONNX graph in the QDQ form onnxruntime fuses into integer kernels:
``DequantizeLinear -> Conv -> QuantizeLinear`` becomes ``QLinearConv`` (with its depthwise
kernels), the same around ``Gemm`` becomes ``QGemm``.

For the networks trained with output quantizers (``quantize.output_bits``): Brevitas' QCDQ
export already puts a QuantizeLinear after every integer layer. Two things stand between it and
onnxruntime's QDQ selectors (onnxruntime ``qdq_selectors.cc``, ``ConvNodeGroupSelector`` and
``GemmNodeGroupSelector``), both changed here without changing what the graph computes:

* the bias: Brevitas exports it as a float constant; the selectors take a bias only as
  ``DequantizeLinear`` of int32 at the scale ``s_x * s_w`` (per output channel). The int32
  value is ``round(b / (s_x s_w))``: the bias rounded to the accumulator's resolution, a change
  below 2**-24 of the accumulator's range at 8 bits;
* the activations' type: Brevitas' signed activations are int8, and onnxruntime's CPU selectors
  fuse a Conv only for uint8 activations (int8 x int8 only where the execution provider allows
  it). An int8 QuantizeLinear with zero point z equals the uint8 one with zero point z + 128
  less 128, rounding and saturation included, so every activation Q/DQ pair (and the Clip that
  keeps a sub-8-bit value in range) moves to uint8. Weights stay int8, symmetric (u8 x s8).

Two more moves, exact as well, let the pooling and the padding run on the quantized tensor:

* a mean over the spatial axes (``ReduceMean`` over axes 2 and 3, as PyTorch exports
  ``x.mean((2, 3))``) becomes ``GlobalAveragePool``, which onnxruntime fuses with the DQ before
  it and the Q after it into ``QLinearGlobalAveragePool``; where the mean dropped the axes, a
  ``Flatten`` follows the QuantizeLinear that reads the pool;
* a zero ``Pad`` read by one QuantizeLinear (the "same" padding of a stride-2 layer) moves after
  it and pads the uint8 tensor with the zero point: Q(pad(x, 0)) = pad(Q(x), z), rounding
  included, so the swish product before it fuses into ``QLinearMul``.

A ReLU that took its layer's output quantizer (``relus.py``) sits between the layer and an unsigned
QuantizeLinear with zero point 0; onnxruntime removes it (``ReluQuantFusion``) before fusing the
layer. What onnxruntime still runs in float: a DQ -> Q pair where one layer's output quantizer feeds
the next layer's input quantizer (a requantization), and a ReLU that kept the quantizer before it
(``quantize.fuse_relu: false``, a ReLU after an addition), between a DequantizeLinear and the next
QuantizeLinear.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
from onnx import helper

from sipa_core.quantize.onnx_integer import GraphIndex, dq_parts, prune_unused, to_uint8

LAYERS = ("Conv", "Gemm")


def _consumers(graph: onnx.GraphProto) -> dict[str, list]:
    out = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def _integer_layers(ix: GraphIndex):
    """Conv / Gemm nodes whose input and weight both come through a DequantizeLinear."""
    for node in ix.g.node:
        if node.op_type in LAYERS and dq_parts(ix, node.input[0]) and dq_parts(ix, node.input[1]):
            yield node


def has_output_quantizers(model: onnx.ModelProto) -> bool:
    """Every integer layer's output read by QuantizeLinear nodes only, or by a ReLU that one
    QuantizeLinear reads (through a padding; and at least one such layer): the graph of a network
    trained with output quantizers."""
    ix, readers = GraphIndex(model.graph), _consumers(model.graph)

    def quantized(name: str) -> bool:
        rs = readers[name]
        if len(rs) == 1 and rs[0].op_type == "Relu":
            rs = readers[rs[0].output[0]]
            if len(rs) == 1 and rs[0].op_type == "Pad":
                rs = readers[rs[0].output[0]]
            return len(rs) == 1 and rs[0].op_type == "QuantizeLinear"
        return bool(rs) and all(r.op_type == "QuantizeLinear" for r in rs)

    layers = list(_integer_layers(ix))
    return bool(layers) and all(quantized(n.output[0]) for n in layers)


def _activation_quantizers(ix: GraphIndex):
    """QuantizeLinear nodes of activations: a computed input, a scalar int8 zero point."""
    for node in ix.g.node:
        if node.op_type != "QuantizeLinear" or ix.const(node.input[0]) is not None or len(node.input) < 3:
            continue
        zp = ix.const(node.input[2])
        if zp is not None and zp.dtype == np.int8 and zp.size == 1:
            yield node, zp


def _to_uint8_activations(ix: GraphIndex, readers: dict) -> int:
    """Each activation's QuantizeLinear, its Clip and its DequantizeLinear readers moved to uint8."""
    moved = 0
    for q, zp in list(_activation_quantizers(ix)):
        name = q.output[0]
        q.input[2] = ix.add_init(name + "_u8zp", to_uint8(zp))
        readers_of_q = readers[name]
        for clip in [r for r in readers_of_q if r.op_type == "Clip"]:
            clip.input[1] = ix.add_init(clip.output[0] + "_u8lo", to_uint8(ix.const(clip.input[1])))
            clip.input[2] = ix.add_init(clip.output[0] + "_u8hi", to_uint8(ix.const(clip.input[2])))
            readers_of_q = readers_of_q + readers[clip.output[0]]
        for dq in [r for r in readers_of_q if r.op_type == "DequantizeLinear"]:
            dq.input[2] = q.input[2]
        moved += 1
    return moved


def _integer_bias(ix: GraphIndex, node) -> list:
    """The layer's float bias as DequantizeLinear(int32 at s_x * s_w, per output channel); the
    nodes to place before the layer (none without a constant bias)."""
    bias = ix.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if bias is None:
        return []
    sx, sw = dq_parts(ix, node.input[0])[1], dq_parts(ix, node.input[1])[1]
    scale = np.broadcast_to((np.asarray(sx, np.float64) * np.asarray(sw, np.float64)).reshape(-1),
                            bias.shape).astype(np.float32)
    q = np.clip(np.round(bias.astype(np.float64) / scale), -2**31, 2**31 - 1).astype(np.int32)
    p = node.output[0] + "_bias"
    args = [ix.add_init(p + "_q", q), ix.add_init(p + "_scale", scale), ix.add_init(p + "_zp", np.zeros_like(q))]
    node.input[2] = p
    return [helper.make_node("DequantizeLinear", args, [p], axis=0)]


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _spatial_means(model: onnx.ModelProto) -> list:
    """ReduceMean nodes that average a 4-D tensor over its axes 2 and 3."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*inferred.value_info, *inferred.input]}
    return [node for node in model.graph.node
            if node.op_type == "ReduceMean" and len(node.input) == 1 and rank.get(node.input[0]) == 4
            and sorted(_attrs(node).get("axes", [])) == [2, 3]]


def _global_pools(model: onnx.ModelProto, readers: dict) -> int:
    """Each spatial mean as GlobalAveragePool, in place (see the module's doc); the count."""
    means = _spatial_means(model)
    for mean in means:
        keepdims = _attrs(mean).get("keepdims", 1)
        mean.op_type = "GlobalAveragePool"
        del mean.attribute[:]
        if keepdims:
            continue
        out = mean.output[0]
        only = readers[out][0] if len(readers[out]) == 1 else None
        last = only if only is not None and only.op_type == "QuantizeLinear" else mean
        flat = last.output[0]
        last.output[0] = flat + "_pooled"
        model.graph.node.append(helper.make_node("Flatten", [last.output[0]], [flat], axis=1))
    return len(means)


def _pads_after_quantizers(ix: GraphIndex, readers: dict) -> int:
    """Each zero Pad read by one activation QuantizeLinear moved after it (module's doc); the count."""
    moved = 0
    for pad in [n for n in ix.g.node if n.op_type == "Pad" and _attrs(n).get("mode", b"constant") == b"constant"]:
        value = ix.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        q = readers[pad.output[0]][0] if len(readers[pad.output[0]]) == 1 else None
        if (value is None or np.any(value != 0) or len(pad.input) > 3 or q is None or q.op_type != "QuantizeLinear"
                or len(q.input) < 3 or ix.const(q.input[2]) is None or ix.const(q.input[2]).size != 1):
            continue
        padded = q.output[0]
        q.input[0], q.output[0] = pad.input[0], padded + "_unpadded"
        fill = ix.add_init(padded + "_fill", ix.const(q.input[2]).reshape(()))
        pad.input[0], pad.output[0] = q.output[0], padded
        del pad.input[2:]
        pad.input.append(fill)
        moved += 1
    return moved


def _topological(graph: onnx.GraphProto) -> None:
    """The graph's nodes reordered so each follows the producers of its inputs (original order kept
    where it already does)."""
    ready = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        index = next(k for k, n in enumerate(pending) if all(i in ready for i in n.input))
        node = pending.pop(index)
        ordered.append(node)
        ready.update(node.output)
    del graph.node[:]
    graph.node.extend(ordered)


def rewrite_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The QDQ graph onnxruntime fuses (see the module's doc); returns (model, counts of what moved)."""
    ix, readers = GraphIndex(model.graph), _consumers(model.graph)
    counts = {"activations to uint8": _to_uint8_activations(ix, readers),
              "spatial means to GlobalAveragePool": _global_pools(model, readers),
              "pads after their quantizer": _pads_after_quantizers(ix, readers)}
    new_nodes, layers = [], set(id(n) for n in _integer_layers(ix))
    for node in list(model.graph.node):
        if id(node) in layers:
            new_nodes.extend(_integer_bias(ix, node))
            counts[node.op_type + " -> QLinear"] = counts.get(node.op_type + " -> QLinear", 0) + 1
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    _topological(model.graph)
    prune_unused(model.graph)
    onnx.checker.check_model(model)
    return model, counts
