"""CPU latency and throughput: the floating-point network in PyTorch against the
quantized network exported to ONNX (every quantized conv and linear layer an
integer kernel) and run by onnxruntime, each with and without its early exit.

    python benchmarks/quantized_latency.py            # after `dvc repro quantize`

Reads the pipeline's outputs: ``models/accelerate.pt`` (fp32, with its exit),
``models/quantize.pt`` (its threshold) and ``models/quantize_onnx/``; the
test images of ``data/prepared/dataset.pt`` (so the exit ratio is the real
one). Batch 1: median latency over single test images; large batch:
images/s over the test split in batches of ``--batch``. A benchmark, not a
test; both runtimes get the same number of threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipa_core.accelerate.record import ExitRecord, load_early_exit  # noqa: E402
from sipa_core.checkpoint import load_model, read_checkpoint  # noqa: E402
from sipa_core.data.prepared import load_prepared  # noqa: E402
from sipa_core.paths import PATHS  # noqa: E402
from sipa_core.quantize.export import OnnxNetwork  # noqa: E402
from sipa_core.quantize.onnx_integer import FLOAT_KERNELS, INTEGER_KERNELS, integer_kernel_counts  # noqa: E402
from sipa_core.quantize.record import QuantRecord  # noqa: E402
from sipa_core.train.evaluation import normalized  # noqa: E402


def torch_runner(net, threshold, adaptive: bool):
    @torch.no_grad()
    def run(x):
        if adaptive:
            return net.adaptive(x, threshold)[0]
        return net.main(x)
    return run


def onnx_runner(onnx: OnnxNetwork, adaptive: bool):
    return lambda x: onnx.logits(x.numpy(), adaptive)[0]


def measure(run, x: torch.Tensor, singles: int, batch: int) -> tuple[float, float]:
    """(median ms for one image, images/s in batches of ``batch``)."""
    for i in range(50):  # warm-up: thread pools, allocator, first-call paths
        run(x[i:i + 1])
    run(x[:batch])
    times = []
    for i in range(singles):
        t0 = time.perf_counter()
        run(x[i:i + 1])
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        run(x[i:i + batch])
    return 1000 * statistics.median(times), len(x) / (time.perf_counter() - t0)


def torch_rows(path) -> list:
    """The floating-point network in PyTorch: with and without its exit (when it has one)."""
    if ExitRecord.of(read_checkpoint(path)) is None:
        main = load_model(path)[0].eval()
        return [("PyTorch fp32", "no", torch.no_grad()(main))]
    net, record = load_early_exit(path)
    return [("PyTorch fp32", "no", torch_runner(net, record.threshold, False)),
            ("PyTorch fp32", f"yes ({record.threshold:.2f})", torch_runner(net, record.threshold, True))]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--singles", type=int, default=300, help="single-image calls timed")
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_prepared(PATHS["prepare"]["out"])
    x = normalized(data.test_x, data.mean, data.std)
    quant = read_checkpoint(PATHS["quantize"]["out"])
    exit_record, label = ExitRecord.of(quant), QuantRecord.of(quant).label
    threshold = exit_record.threshold if exit_record else None
    folder = Path(PATHS["quantize"]["onnx"])
    files = {name: folder / f"{name}.onnx" for name in ("full", "path", "rest") if (folder / f"{name}.onnx").is_file()}
    onnx = OnnxNetwork.load(files, threshold, threads=args.threads)
    rows = torch_rows(PATHS["accelerate"]["out"]) + [
        (f"onnxruntime {label}", "no", onnx_runner(onnx, False))]
    if threshold is not None:
        rows.append((f"onnxruntime {label}", f"yes ({threshold:.2f})", onnx_runner(onnx, True)))
    layers = {k: n for k, n in integer_kernel_counts(files["full"]).items() if k in INTEGER_KERNELS + FLOAT_KERNELS}
    print(f"{len(x)} test images of {data.image_size[0]}x{data.image_size[1]}, {args.threads} threads, "
          f"torch {torch.__version__}; onnxruntime runs full.onnx's layers as {layers}\n")
    print(f"| runtime | exit | batch 1: median ms | batch {args.batch}: images/s |\n|---|---|---|---|")
    for name, exit_text, run in rows:
        ms, ips = measure(run, x, args.singles, args.batch)
        print(f"| {name} | {exit_text} | {ms:.2f} | {ips:.0f} |", flush=True)


if __name__ == "__main__":
    main()
