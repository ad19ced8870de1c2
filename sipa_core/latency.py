"""Where a network's multiply-adds run in onnxruntime, and how fast it runs there, on the CPU.

Kernels. onnxruntime rewrites a graph before running it: its QDQ fusions turn
``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv`` and the
like (extended level), then change layouts (all optimisations). Which kernel
runs a layer is decided at the extended level, so ``kernel_macs`` reads the
graph onnxruntime saves at that level: each conv or matrix-product node's
multiply-adds per image (output elements x weights per output, the output
shape from onnxruntime's profile of one run of that graph, the weight from
the node's initializer), summed by node type. ``integer_share`` is the part of them in
integer kernels (``QLinearConv``, ``ConvInteger``, ``QGemm``, ...).
Elementwise operations (activations, gates, additions) are not multiply-adds
of a layer and are left out of both sides.

Speed. ``measure`` times callables on the same images, interleaved: each
round times a block of single-image calls and one pass in batches for every
callable in turn, so a slow moment of a noisy machine falls on all of them;
the figures are medians over the single calls (milliseconds per image at
batch 1) and over the rounds (images per second at the large batch).
"""

from __future__ import annotations

import collections
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from sipa_core.quantize.onnx_integer import INTEGER_KERNELS

# The input a layer's weight sits at, per node type (everything else: no multiply-adds counted).
CONV_WEIGHT = {"Conv": 1, "FusedConv": 1, "ConvInteger": 1, "QLinearConv": 3, "NhwcFusedConv": 1}
MATMUL_WEIGHT = {"Gemm": 1, "MatMul": 1, "FusedMatMul": 1, "MatMulInteger": 1, "QGemm": 3, "QLinearMatMul": 3,
                 "MatMulIntegerToFloat": 1}


def _session_options(threads: int, level: str, optimized_path=None):
    import onnxruntime as ort  # noqa: PLC0415 (heavy)

    so = ort.SessionOptions()
    so.graph_optimization_level = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: the optimiser's notes on unused initializers are not news
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def session(path, threads: int):
    """An onnxruntime CPU session, every graph optimisation on, ``threads`` intra-op threads."""
    import onnxruntime as ort  # noqa: PLC0415 (heavy)

    return ort.InferenceSession(str(path), _session_options(threads, "all"), providers=["CPUExecutionProvider"])


def _inputs_of_one(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Zeros for every graph input at one image (symbolic dimensions read as 1)."""
    out = {}
    for info in graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in info.type.tensor_type.shape.dim]
        out[info.name] = np.zeros(dims, np.float32)
    return out


def _output_shapes(profile_file: str) -> dict[str, tuple]:
    """Each node's first output shape, from onnxruntime's profile of one run (node name -> shape)."""
    out = {}
    for event in json.loads(Path(profile_file).read_text()):
        args = event.get("args", {})
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and args.get("output_type_shape"):
            out[event["name"][:-len("_kernel_time")]] = tuple(next(iter(args["output_type_shape"][0].values())))
    return out


def _weight_dims(name: str, inits: dict, producers: dict) -> list[int] | None:
    """The weight's dimensions: an initializer, or one reached back through DequantizeLinear / Clip
    (a layer onnxruntime left in float with its quantized weight)."""
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type not in ("DequantizeLinear", "Clip", "Cast"):
            return None
        name = node.input[0]
    return list(inits[name].dims)


def _node_macs(node, shapes: dict, inits: dict, producers: dict) -> float:
    """Multiply-adds per image of a conv or matrix-product node (0 for any other node)."""
    if node.op_type in CONV_WEIGHT:
        w = _weight_dims(node.input[CONV_WEIGHT[node.op_type]], inits, producers)
        per_output = int(np.prod(w[1:])) if w else 0
    elif node.op_type in MATMUL_WEIGHT:
        w = _weight_dims(node.input[MATMUL_WEIGHT[node.op_type]], inits, producers)
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        per_output = (w[1] if trans_b else w[0]) if w else 0
    else:
        return 0.0
    out = shapes.get(node.name)
    if out is None or not per_output:
        raise ValueError(f"cannot count the multiply-adds of {node.op_type} node {node.name!r}")
    return float(np.prod(out)) * per_output


def kernel_macs(path) -> dict[str, float]:
    """Multiply-adds per image by the node type onnxruntime runs each layer with (module doc)."""
    import onnxruntime as ort  # noqa: PLC0415 (heavy)

    with tempfile.TemporaryDirectory() as tmp:
        so = _session_options(1, "extended", Path(tmp) / "extended.onnx")
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, _inputs_of_one(onnx.load(str(path)).graph))
        shapes = _output_shapes(sess.end_profiling())
        graph = onnx.load(str(Path(tmp) / "extended.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: node for node in graph.node for o in node.output}
    macs = collections.Counter()
    for node in graph.node:
        n = _node_macs(node, shapes, inits, producers)
        if n:
            macs[node.op_type] += n
    return dict(macs.most_common())


def integer_share(macs: dict[str, float]) -> float:
    """The part of the multiply-adds that runs in integer kernels."""
    total = sum(macs.values())
    return sum(v for k, v in macs.items() if k in INTEGER_KERNELS) / total if total else 0.0


@dataclass(frozen=True)
class Speed:
    """A network's measured speed: median milliseconds per image at batch 1, images per second
    in batches of ``batch`` (median over rounds), with ``threads`` intra-op threads."""

    ms_batch1: float
    images_per_s: float
    batch: int
    threads: int


def measure(runners: dict, x: np.ndarray, *, threads: int, singles: int = 200, batch: int = 256,
            rounds: int = 5, warmup: int = 20) -> dict[str, Speed]:
    """Each runner (a callable on a float32 batch) timed on the images ``x``, interleaved (module doc):
    ``singles`` single-image calls in all, and ``rounds`` passes over ``x`` in batches of ``batch``."""
    for run in runners.values():
        for i in range(warmup):
            run(x[i % len(x):i % len(x) + 1])
        run(x[:batch])
    single = {name: [] for name in runners}
    rate = {name: [] for name in runners}
    per_round = max(1, singles // rounds)
    for r in range(rounds):
        for name, run in runners.items():
            for i in range(r * per_round, (r + 1) * per_round):
                k = i % len(x)
                t0 = time.perf_counter()
                run(x[k:k + 1])
                single[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(0, len(x), batch):
                run(x[i:i + batch])
            rate[name].append(len(x) / (time.perf_counter() - t0))
    return {name: Speed(1000 * statistics.median(single[name]), statistics.median(rate[name]), batch, threads)
            for name in runners}


def time_by_op(path, x: np.ndarray, *, threads: int, runs: int = 50) -> dict[str, float]:
    """Where the time goes: microseconds per run by node type, from onnxruntime's profiler over
    ``runs`` runs on ``x`` (every graph optimisation on), most expensive first."""
    import onnxruntime as ort  # noqa: PLC0415 (heavy)

    with tempfile.TemporaryDirectory() as tmp:
        so = _session_options(threads, "all")
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    total = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total[event["args"].get("op_name", "?")] += event["dur"] / runs
    return dict(total.most_common())
