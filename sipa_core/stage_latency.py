"""The report's measured columns: every stage's network in onnxruntime on the CPU.

Each floating-point stage's checkpoint is exported to ONNX as it is (with its
exit, as the adaptive pair ``path`` + ``rest``, where the accelerating stage
kept one); the quantizing stage's network is its integer graph
(``models/quantize_onnx``). All of them run with the same threads and every
graph optimisation, timed interleaved on the test images
(``sipa_core.latency.measure``): median milliseconds per image at batch 1,
images per second at the large batch. Speed is measured, not counted: it
changes with the machine and its load, like a stage's wall time.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from sipa_core.accelerate.record import ExitRecord, load_early_exit
from sipa_core.checkpoint import load_model, read_checkpoint
from sipa_core.data.prepared import load_prepared
from sipa_core.errors import SipaError
from sipa_core.latency import Speed, measure
from sipa_core.quantize.export import OnnxNetwork, export_network
from sipa_core.train.evaluation import normalized

LATENCY_KEYS = ("threads", "singles", "batch", "rounds")
DEFAULT_LATENCY = {"threads": 2, "singles": 200, "batch": 256, "rounds": 5}


def check_latency(value) -> str | None:
    """``report.latency``: a mapping of the measurement's settings, each a positive integer."""
    bad = [k for k in value if k not in LATENCY_KEYS]
    if bad:
        return f"unknown key {bad[0]!r}; known: {', '.join(LATENCY_KEYS)}"
    wrong = [k for k, v in value.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    return f"{wrong[0]} must be a positive integer" if wrong else None


@dataclass(frozen=True)
class StageGraph:
    """A stage's network as onnxruntime runs it: its ONNX files, and its exit's threshold."""

    files: dict[str, Path]
    threshold: float | None = None


def float_graph(checkpoint: Path, image_size: int, folder: Path) -> StageGraph:
    """A floating-point stage's network exported as it is (with its exit where it has one)."""
    record = ExitRecord.of(read_checkpoint(checkpoint))
    if record is None:
        model = load_model(checkpoint)[0].eval()
        return StageGraph(export_network(model, None, (3, image_size, image_size), folder, quantized=False))
    net, record = load_early_exit(checkpoint)
    files = export_network(net.main, net, (3, image_size, image_size), folder, quantized=False)
    return StageGraph(files, record.threshold)


def quantized_graph(checkpoint: Path, onnx_folder: Path) -> StageGraph:
    """The quantizing stage's integer graph, as the stage exported it."""
    files = {n: Path(onnx_folder) / f"{n}.onnx" for n in ("full", "path", "rest")
             if (Path(onnx_folder) / f"{n}.onnx").is_file()}
    if "full" not in files:
        raise SipaError(f"{onnx_folder}: no full.onnx; run the quantize stage first")
    record = ExitRecord.of(read_checkpoint(checkpoint))
    return StageGraph(files, record.threshold if record else None)


def stage_speeds(cfg: dict, stages: list[str]) -> dict[str, Speed]:
    """Each stage's network measured (``cfg``: the report's config; ``stages``: the stages in the
    table), with its exit where one is kept."""
    settings = cfg["latency"]
    data = load_prepared(cfg["data"])
    x = normalized(data.split("test")[0], data.mean, data.std).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for stage in stages:
            if stage == "quantize":
                graph = quantized_graph(Path(cfg["quantize_model"]), Path(cfg["quantize_onnx"]))
            else:
                graph = float_graph(Path(cfg[f"{stage}_model"]), data.image_size[0], Path(tmp) / stage)
            onnx = OnnxNetwork.load(graph.files, graph.threshold, threads=settings["threads"])
            runners[stage] = (lambda o: lambda b: o.logits(b, True))(onnx)
        return measure(runners, x, threads=settings["threads"], singles=settings["singles"],
                       batch=settings["batch"], rounds=settings["rounds"])
