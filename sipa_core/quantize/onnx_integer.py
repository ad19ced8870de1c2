"""The graph of a quantized network trained without output quantizers
(``quantize.output_bits: null``) rewritten so that onnxruntime runs every quantized
conv and linear layer as an integer kernel: ``ConvInteger`` / ``MatMulInteger``.
(A network trained with output quantizers takes the QDQ route, ``onnx_qdq.py``:
``QLinearConv`` / ``QGemm``, faster.)

Why a rewrite. Brevitas' QCDQ export gives each layer ``QuantizeLinear(x) ->
DequantizeLinear -> Conv <- DequantizeLinear(int8 weight)``. onnxruntime turns a
Conv into ``QLinearConv`` only when a QuantizeLinear follows its output (its QDQ
Conv selector); without output quantizers the next quantizer sits after the
activation function, the SE gate or the residual addition, so onnxruntime would
dequantize the weights and run a float convolution.

The rewrite is exact up to float rounding: with the input's per-tensor scale s_x
and zero point z_x and the weights' per-channel scales s_w (symmetric: zero
point 0), ``conv(s_x (x_q - z_x), s_w w_q) + b = s_x s_w ConvInteger(x_q, w_q,
z_x, 0) + b``. Each layer becomes ``ConvInteger`` (int32 accumulator) ->
``DequantizeLinear(int32, s_x s_w per output channel)`` -> ``Add`` (the bias
kept in float: onnxruntime's own bias quantization rounds it). Activations
enter as uint8 (zero point moved by 128) and weights as uint8 with zero point
128, which is the same arithmetic: MLAS' u8u8 GEMM is exact on every x86 CPU,
while int8 activations take a slow path and u8s8 can saturate on AVX2 without
VNNI. Below 8 bits the same graph runs the 2..7-bit values in 8-bit
containers (a Clip after each QuantizeLinear keeps them in range): integer
arithmetic, no faster than 8 bits; onnxruntime has no 4-bit activation kernels
(its int4 types serve weight-only ``MatMulNBits``).
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

INTEGER_KERNELS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat")
FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "MatMul")  # a layer onnxruntime runs in floating point


class GraphIndex:
    """Index of a graph: who produces each tensor, and its constants."""

    def __init__(self, graph: onnx.GraphProto):
        self.g = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.inits = {i.name: i for i in graph.initializer}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def add_init(self, name: str, array: np.ndarray) -> str:
        self.g.initializer.append(numpy_helper.from_array(array, name))
        self.inits[name] = self.g.initializer[-1]
        return name


def dq_parts(ix: GraphIndex, name: str):
    """(quantized tensor name, scale, zero point, axis) of a DequantizeLinear output, or None."""
    dq = ix.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    scale = ix.const(dq.input[1])
    zp = ix.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.int8)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    return dq.input[0], scale, zp, axis


def _int_weight(ix: GraphIndex, name: str) -> np.ndarray | None:
    """The integer weight feeding a weight DQ: an initializer, or Clip(initializer) (Brevitas
    clips narrow-range / sub-8-bit weights; folded here so the weight is one constant)."""
    w = ix.const(name)
    if w is not None:
        return w
    clip = ix.producer.get(name)
    if clip is None or clip.op_type != "Clip" or len(clip.input) < 3 or ix.const(clip.input[0]) is None:
        return None
    lo, hi = ix.const(clip.input[1]), ix.const(clip.input[2])
    return np.clip(ix.const(clip.input[0]), lo, hi).astype(ix.const(clip.input[0]).dtype)


def _layer_operands(ix: GraphIndex, node):
    """Integer operands of a Conv/Gemm fed by DQ(activation) and DQ(constant weight), or None
    when the layer is not in that form (a float layer, asymmetric weights, per-channel input)."""
    x, w = dq_parts(ix, node.input[0]), dq_parts(ix, node.input[1])
    if x is None or w is None or x[1] is None or x[1].size != 1 or x[2] is None:
        return None
    w_int = _int_weight(ix, w[0])
    if w_int is None or w[1] is None or np.any(w[2] != 0):  # ConvInteger: scalar weight zero point only
        return None
    bias = ix.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if bias is None and len(node.input) > 2 and node.input[2]:
        return None  # a bias computed at run time: left as it is rather than dropped
    return x[0], np.asarray(x[1], np.float64).reshape(()), x[2].reshape(()), w_int, \
        np.asarray(w[1], np.float64).reshape(-1), bias


def to_uint8(a: np.ndarray) -> np.ndarray:
    """An int8 array as uint8 with the zero point moved by 128 (value - zp is unchanged)."""
    return (a.astype(np.int16) + 128).astype(np.uint8) if a.dtype == np.int8 else a


def _uint8_input(ix: GraphIndex, xq: str, zx: np.ndarray, extra: list, done: dict) -> tuple[str, np.ndarray]:
    """The activation quantized to uint8 (zero point + 128): MLAS' u8u8 GEMM is fast and exact
    everywhere; int8 activations take a slow path, u8s8 can saturate on AVX2 without VNNI.
    QuantizeLinear(x, s, z + 128) to uint8 equals QuantizeLinear(x, s, z) to int8 plus 128,
    rounding and saturation included; a sub-8-bit Clip after it moves by 128 too."""
    if zx.dtype != np.int8:
        return xq, zx
    if xq not in done:
        clip = ix.producer.get(xq)
        q = ix.producer.get(clip.input[0]) if clip is not None and clip.op_type == "Clip" else clip
        if q is None or q.op_type != "QuantizeLinear":
            return xq, zx  # not produced by a QuantizeLinear: keep int8
        zp = ix.add_init(xq + "_u8zp", to_uint8(zx))
        out = xq + "_u8"
        if q is clip:
            extra.append(helper.make_node("QuantizeLinear", [q.input[0], q.input[1], zp], [out]))
        else:
            lo, hi = (ix.add_init(xq + n, to_uint8(ix.const(clip.input[i]))) for n, i in (("_u8lo", 1), ("_u8hi", 2)))
            extra.append(helper.make_node("QuantizeLinear", [q.input[0], q.input[1], zp], [out + "_q"]))
            extra.append(helper.make_node("Clip", [out + "_q", lo, hi], [out]))
        done[xq] = out
    return done[xq], to_uint8(zx)


def _rescale(ix: GraphIndex, node, acc: str, scale: np.ndarray, bias, axis: int) -> list:
    """int32 accumulator -> float: DequantizeLinear(int32, s_x*s_w per output channel) (one op
    for Cast+Mul), then Add the float bias (kept in float: quantizing it would round it)."""
    p, out = node.output[0] + "_int", node.output[0]
    s = ix.add_init(p + "_scale", scale.astype(np.float32))
    z = ix.add_init(p + "_zp", np.zeros(scale.shape, np.int32))
    nodes = [helper.make_node("DequantizeLinear", [acc, s, z], [p + "_f" if bias is not None else out], axis=axis)]
    if bias is not None:
        shape = (1, -1, 1, 1) if axis == 1 and node.op_type == "Conv" else (1, -1)
        b = ix.add_init(p + "_bias", bias.astype(np.float32).reshape(shape))
        nodes.append(helper.make_node("Add", [p + "_f", b], [out]))
    return nodes


def _conv_integer(ix: GraphIndex, node, ops, extra: list, done: dict) -> list:
    """Conv -> ConvInteger (same pads/strides/groups: ConvInteger pads with x's zero point,
    i.e. a real zero) -> rescale. uint8 x uint8 (zero points 128) for MLAS' exact fast path."""
    xq, sx, zx, w, sw, bias = ops
    p = node.output[0] + "_int"
    xq, zx = _uint8_input(ix, xq, zx, extra, done)
    wn, zwn = ix.add_init(p + "_w", to_uint8(w)), ix.add_init(p + "_wzp", to_uint8(np.zeros((), w.dtype)))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    conv = helper.make_node("ConvInteger", [xq, wn, ix.add_init(p + "_xzp", zx), zwn], [p + "_acc"],
                            name=node.name + "_int", **attrs)
    return [conv] + _rescale(ix, node, p + "_acc", sx * sw, bias, 1)


def _matmul_integer(ix: GraphIndex, node, ops, extra: list, done: dict) -> list | None:
    """Gemm(x, W^T) + b -> MatMulInteger(x_q, W_q^T) -> rescale (a plain Linear only)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
        return None
    xq, sx, zx, w, sw, bias = ops
    w = w.T if attrs.get("transB", 0) else w  # MatMulInteger wants B as [K, N]
    p = node.output[0] + "_int"
    xq, zx = _uint8_input(ix, xq, zx, extra, done)
    args = [xq, ix.add_init(p + "_w", np.ascontiguousarray(to_uint8(w))), ix.add_init(p + "_xzp", zx),
            ix.add_init(p + "_wzp", to_uint8(np.zeros((), w.dtype)))]
    mm = helper.make_node("MatMulInteger", args, [p + "_acc"], name=node.name + "_int")
    return [mm] + _rescale(ix, node, p + "_acc", sx * sw, bias, 1)


def prune_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads (the float DQ/Clip chains replaced above) and
    initializers nobody reads, repeatedly, so the weights exist once, as int8."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        if not dead:
            break
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def rewrite_integer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Replace every DQ-fed Conv and Gemm by its integer form; returns (model, counts of the
    layers rewritten and kept)."""
    ix, new_nodes, done, u8_done = GraphIndex(model.graph), [], collections.Counter(), {}
    for node in list(model.graph.node):
        ops = _layer_operands(ix, node) if node.op_type in ("Conv", "Gemm") else None
        repl, extra = None, []  # extra: the uint8 QuantizeLinear, placed before the layer
        if ops is not None:
            build = _conv_integer if node.op_type == "Conv" else _matmul_integer
            repl = build(ix, node, ops, extra, u8_done)
            repl = extra + repl if repl else None
        done[node.op_type + (" -> integer" if repl else " (kept)")] += node.op_type in ("Conv", "Gemm")
        new_nodes.extend(repl or [node])
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    prune_unused(model.graph)
    onnx.checker.check_model(model)
    return model, {k: v for k, v in done.items() if v}


def session_and_warnings(path, threads: int | None = None, optimized_path=None):
    """An onnxruntime session (all graph optimisations) and the warnings and errors it logged while
    loading (onnxruntime logs to the C-level stderr, so file descriptor 2 is captured)."""
    import onnxruntime as ort  # noqa: PLC0415 (heavy, export only)

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    with tempfile.TemporaryFile() as tmp:  # ORT logs to the C-level stderr (fd 2)
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(tmp.fileno(), 2)
        try:
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        log = tmp.read().decode(errors="replace")
    return sess, [line for line in log.splitlines() if "[W:" in line or "[E:" in line]


def integer_kernel_counts(path) -> dict[str, int]:
    """Op types of the graph onnxruntime really runs (all optimisations applied, saved through
    ``optimized_model_filepath``), most frequent first."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session_and_warnings(path, threads=1, optimized_path=optimized)
        ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return dict(ops.most_common())
