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

What stays float: the activation functions, the SE gate's product and pooling, the residual
additions, run between a layer's DequantizeLinear and the next layer's QuantizeLinear.
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
    """Every integer layer's output read by QuantizeLinear nodes only (and at least one such layer):
    the graph of a network trained with output quantizers."""
    ix, readers = GraphIndex(model.graph), _consumers(model.graph)
    layers = list(_integer_layers(ix))
    return bool(layers) and all(readers[n.output[0]] and all(r.op_type == "QuantizeLinear"
                                                              for r in readers[n.output[0]]) for n in layers)


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


def rewrite_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The QDQ graph onnxruntime fuses (see the module's doc); returns (model, counts of what moved)."""
    ix, readers = GraphIndex(model.graph), _consumers(model.graph)
    counts = {"activations to uint8": _to_uint8_activations(ix, readers)}
    new_nodes, layers = [], set(id(n) for n in _integer_layers(ix))
    for node in list(model.graph.node):
        if id(node) in layers:
            new_nodes.extend(_integer_bias(ix, node))
            counts[node.op_type + " -> QLinear"] = counts.get(node.op_type + " -> QLinear", 0) + 1
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    prune_unused(model.graph)
    onnx.checker.check_model(model)
    return model, counts
