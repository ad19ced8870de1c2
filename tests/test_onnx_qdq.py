"""The QDQ rewrite's moves of pooling and padding (sipa_core/quantize/onnx_qdq.py): the graph
computes exactly what it computed before, and onnxruntime then runs the pools and the product
before a padding in integer kernels."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sipa_core.quantize.onnx_qdq import rewrite_qdq

SHAPE = [2, 4, 5, 5]


def _qdq(name: str, src: str, scale: float, zp: int, nodes: list, inits: list) -> str:
    """``src`` through an int8 QuantizeLinear and its DequantizeLinear (Brevitas' activations)."""
    inits += [numpy_helper.from_array(np.float32(scale), name + "_s"),
              numpy_helper.from_array(np.int8(zp), name + "_z")]
    nodes += [helper.make_node("QuantizeLinear", [src, name + "_s", name + "_z"], [name + "_q"]),
              helper.make_node("DequantizeLinear", [name + "_q", name + "_s", name + "_z"], [name])]
    return name


def _graph() -> onnx.ModelProto:
    """x -> Q/DQ -> spatial mean (kept axes) -> Q/DQ; the mean without its axes -> Q/DQ; a swish-like
    product -> zero Pad -> Q/DQ: what the exporter writes for SE pooling, the head and a stride-2
    layer's "same" padding."""
    nodes, inits = [], [numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 1, 2], np.int64), "pads")]
    x = _qdq("xq", "x", 0.05, 3, nodes, inits)
    gate = _qdq("gq", "x", 0.02, -10, nodes, inits)
    nodes += [helper.make_node("ReduceMean", [x], ["se"], axes=[2, 3], keepdims=1),
              helper.make_node("ReduceMean", [x], ["head"], axes=[2, 3], keepdims=0),
              helper.make_node("Mul", [x, gate], ["prod"]),
              helper.make_node("Pad", ["prod", "pads"], ["padded"], mode="constant")]
    outs = [_qdq(n + "_out", n, s, z, nodes, inits) for n, s, z in
            (("se", 0.03, -5), ("head", 0.03, 7), ("padded", 0.004, -100))]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * r) for o, r in zip(outs, (4, 2, 4))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _session(model: onnx.ModelProto, level, optimized: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_pools_and_pads_move_without_changing_a_value():
    before = _graph()
    after, counts = rewrite_qdq(_graph())
    assert counts["spatial means to GlobalAveragePool"] == 2 and counts["pads after their quantizer"] == 1
    ops = collections.Counter(n.op_type for n in after.graph.node)
    assert ops["GlobalAveragePool"] == 2 and "ReduceMean" not in ops and ops["Flatten"] == 1
    x = np.random.default_rng(0).normal(0, 2, SHAPE).astype(np.float32)
    plain = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want, got = _session(before, plain).run(None, {"x": x}), _session(after, plain).run(None, {"x": x})
    assert [w.shape for w in want] == [g.shape for g in got] == [(2, 4, 1, 1), (2, 4), (2, 4, 6, 8)]
    for w, g in zip(want, got):
        assert np.array_equal(w, g)


def test_onnxruntime_runs_the_moved_pools_and_product_in_integer_kernels(tmp_path):
    path = str(tmp_path / "optimized.onnx")
    _session(rewrite_qdq(_graph())[0], ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, path)
    optimized = onnx.load(path).graph
    ops = collections.Counter(n.op_type for n in optimized.node)
    assert ops["QLinearGlobalAveragePool"] == 2 and ops["QLinearMul"] == 1, ops
    assert not {"Mul", "ReduceMean", "GlobalAveragePool"} & set(ops), ops
    producer = {o: n.op_type for n in optimized.node for o in n.output}
    assert [producer.get(n.input[0]) for n in optimized.node if n.op_type == "Pad"] == ["QLinearMul"]


def test_a_pad_with_another_fill_or_reader_stays_where_it_is():
    model = _graph()
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    model.graph.initializer.append(numpy_helper.from_array(np.float32(1.0), "one"))
    pad.input.append("one")  # padding with 1.0, not with the quantized zero
    after, counts = rewrite_qdq(model)
    assert counts["pads after their quantizer"] == 0
    assert next(n for n in after.graph.node if n.op_type == "Pad").input[0] == "prod"
