"""The quantizing stage's integer graph against the same network in float, and against
onnxruntime's own post-training static quantization of it, all in onnxruntime on the CPU.

    python benchmarks/quantized_latency.py            # after `dvc repro quantize`
    python benchmarks/quantized_latency.py --profile  # and where the integer graph's time goes
    python benchmarks/quantized_latency.py --with-run ../filter-run   # beside another run's graphs

Reads the pipeline's outputs: ``models/accelerate.pt`` (the float network the
quantizing stage started from, with its exit where one was kept),
``models/quantize.pt`` (its threshold) and ``models/quantize_onnx/``; the
validation and test images of ``data/prepared/dataset.pt``. The float network
is exported to ONNX as it is; onnxruntime's ``quantize_static`` (QDQ,
per-channel int8 weights, uint8 activations) is calibrated on validation
images. Every graph runs with the same intra-op threads and every graph
optimisation; they are timed interleaved (``sipa_core.latency.measure``):
median milliseconds per image at batch 1 over single test images, images/s
over the test split in batches of ``--batch`` (median of the rounds). For
each graph: its test accuracy and the share of its multiply-adds that
onnxruntime runs in integer kernels. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipa_core.checkpoint import read_checkpoint  # noqa: E402
from sipa_core.data.prepared import load_prepared  # noqa: E402
from sipa_core.latency import integer_share, kernel_macs, measure, time_by_op  # noqa: E402
from sipa_core.paths import PATHS  # noqa: E402
from sipa_core.quantize.export import OnnxNetwork, onnx_predictions  # noqa: E402
from sipa_core.quantize.record import QuantRecord  # noqa: E402
from sipa_core.stage_latency import float_graph, quantized_graph  # noqa: E402
from sipa_core.train.evaluation import accuracy, normalized  # noqa: E402


def static_quantization(float_full: Path, out: Path, images: np.ndarray) -> Path:
    """onnxruntime's quantize_static of the float graph, calibrated on ``images``."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,  # noqa: PLC0415
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": images[i:i + 50]} for i in range(0, len(images), 50)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_full), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return out


def run_graphs(root: Path, data, folder: Path, prefix: str = "") -> list[tuple[str, dict, float | None]]:
    """(name, ONNX files, exit threshold) of a run's float network (the accelerating stage's,
    exported into ``folder``) and its integer graph (the quantizing stage's); ``root`` is the
    run's folder. The report stage's own exports (``sipa_core.stage_latency``)."""
    fp = float_graph(root / PATHS["accelerate"]["out"], data.image_size[0], folder)
    q = quantized_graph(root / PATHS["quantize"]["out"], root / PATHS["quantize"]["onnx"])
    label = QuantRecord.of(read_checkpoint(root / PATHS["quantize"]["out"])).label
    return [(f"{prefix}float", fp.files, fp.threshold),
            (f"{prefix}integer {label} (this project)", q.files, q.threshold)]


def graphs(args, data, tmp: Path) -> list[tuple[str, dict, float | None]]:
    """This run's float and integer graphs, onnxruntime's static quantization of the float one,
    and the float and integer graphs of each run named by ``--with-run``."""
    ours = run_graphs(Path("."), data, tmp / "float")
    val = normalized(data.val_x[:args.calibration], data.mean, data.std).numpy()
    static = {"full": static_quantization(ours[0][1]["full"], tmp / "static.onnx", val)}
    others = [g for k, root in enumerate(args.with_run)
              for g in run_graphs(Path(root), data, tmp / f"float{k}", f"{Path(root).resolve().name}: ")]
    return [*ours, ("onnxruntime quantize_static W8A8", static, None), *others]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--singles", type=int, default=300, help="single-image calls timed per graph")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calibration", type=int, default=500, help="validation images calibrating quantize_static")
    p.add_argument("--profile", action="store_true", help="time by node type of the integer graph at batch 1")
    p.add_argument("--with-run", action="append", default=[], metavar="DIR",
                   help="another run's folder on the same data (e.g. filter pruning): its float and integer "
                        "graphs measured in the same interleaved rounds")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_prepared(PATHS["prepare"]["out"])
    x_u8, y = data.split("test")
    x = normalized(x_u8, data.mean, data.std).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        rows, runners = [], {}
        for name, files, threshold in graphs(args, data, Path(tmp)):
            onnx = OnnxNetwork.load(files, threshold, threads=args.threads)
            macs = kernel_macs(files["full"])  # the full graph's, with or without the exit
            for adaptive in ([False, True] if onnx.path is not None else [False]):
                key = f"{name}, exit at {threshold:.2f}" if adaptive else name
                acc = accuracy(onnx_predictions(onnx, x_u8, data.mean, data.std, adaptive=adaptive), y)
                rows.append((key, acc, integer_share(macs), macs))
                runners[key] = (lambda o, a: lambda b: o.logits(b, a))(onnx, adaptive)
            if args.profile and name.startswith("integer"):
                profile = time_by_op(files["full"], x[:1], threads=args.threads)
        speeds = measure(runners, x, threads=args.threads, singles=args.singles, batch=args.batch,
                         rounds=args.rounds)
    base = speeds[rows[0][0]]
    print(f"{len(x)} test images of {h_w(data)}, {args.threads} threads, onnxruntime {onnxruntime.__version__}, "
          f"medians of {args.rounds} interleaved rounds\n")
    print(f"| graph | test accuracy | integer share of multiply-adds | batch 1: ms | batch {args.batch}: images/s "
          f"| speed-up at batch 1 / {args.batch} |\n|---|---|---|---|---|---|")
    for key, acc, share, _ in rows:
        s = speeds[key]
        print(f"| {key} | {100 * acc:.2f}% | {100 * share:.1f}% | {s.ms_batch1:.3f} | {s.images_per_s:,.0f} | "
              f"{base.ms_batch1 / s.ms_batch1:.2f}x / {s.images_per_s / base.images_per_s:.2f}x |")
    print("\nmultiply-adds per image by kernel:")
    for key, _, _, macs in rows:
        print(f"- {key}: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in macs.items()))
    if args.profile:
        total = sum(profile.values())
        print("\ninteger graph, batch 1, time by node type: " +
              ", ".join(f"{k} {v:.0f} us ({100 * v / total:.0f}%)" for k, v in profile.items()))


def h_w(data) -> str:
    return "x".join(str(v) for v in data.image_size)


if __name__ == "__main__":
    main()
