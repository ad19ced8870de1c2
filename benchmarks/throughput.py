"""Training and evaluation throughput: a plain reference loop against the project's path, side by side.

    python benchmarks/throughput.py                          # both architectures, defaults for the device
    python benchmarks/throughput.py --arch sipa_baseline_32 --steps 30 --batch 128 --fast compile

(a) reference: torchvision-style data pipeline (a Dataset of uint8 images,
    per-image RandomCrop(pad 4) + RandomHorizontalFlip + ToDtype + Normalize
    transforms, DataLoader), fp32, NCHW, SGD with momentum, cross-entropy.
(b) project: the one training engine (``sipa_core.train.fit``): the data set
    on the device as uint8, batched crop/flip/normalise (and mixup) on the
    device, channels_last, bf16 autocast on GPUs, cudnn.benchmark, optional
    torch.compile (``--fast compile``).

Both train the same freshly initialised network for the same number of
steps after warm-up; images/s is timed with device synchronisation (CUDA
events on GPUs). Peak memory: CUDA peak allocated on GPUs; on CPUs the
process's peak resident size after each part. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipa_core.data.prepared import PreparedData  # noqa: E402
from sipa_core.models import create_model  # noqa: E402
from sipa_core.train import default_recipe, fit, predict  # noqa: E402

MEAN, STD = [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]


def synthetic(n: int, classes: int = 100, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


class _Clock:
    """Seconds between two points, synchronised with the device (CUDA events on GPUs)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def peak_memory(device) -> float:
    """MiB: CUDA peak allocated since the last reset, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def reference(arch, x, y, steps, warmup, batch, workers, device):
    """The plain loop: per-image torchvision transforms in a DataLoader, fp32, NCHW."""
    tf = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

    class Images(Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return tf(x[i]), y[i]

    torch.manual_seed(0)
    model = create_model(arch, num_classes=100).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(Images(), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    reset_peak(device)

    def run(n):
        done = 0
        while done < n:
            for xb, yb in loader:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                if done == n:
                    return

    run(warmup)
    with _Clock(device) as clock:
        run(steps)
    train_ips = steps * batch / clock.seconds

    model.eval()
    eval_loader = DataLoader(torch.utils.data.TensorDataset(x[: steps * batch], y[: steps * batch]),
                             batch_size=500, num_workers=0)
    norm = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    with torch.no_grad():
        for xb, _ in eval_loader:  # warm-up
            model(norm(xb).to(device))
            break
        with _Clock(device) as clock:
            n = 0
            for xb, _ in eval_loader:
                model(norm(xb).to(device))
                n += len(xb)
    return {"train_images_per_sec": train_ips, "eval_images_per_sec": n / clock.seconds,
            "peak_mib": peak_memory(device)}


def project(arch, x, y, steps, warmup, batch, device, fast: set[str]):
    """The engine's path: ``fit`` for warm-up + timed epochs of ``steps`` steps each."""
    n = steps * batch
    data = PreparedData(x[:n], y[:n], x[:0], y[:0], x[:n], y[:n], [str(i) for i in range(100)], MEAN, STD,
                        {"source": "synthetic"})
    cuda = device.type == "cuda"
    recipe = default_recipe(epochs=1 + max(1, -(-warmup // steps)), batch_size=batch, lr=0.1, schedule="constant",
                            channels_last="nchw" not in fast,
                            precision="bf16" if cuda and "fp32" not in fast else "fp32",
                            compile="compile" in fast, deterministic=False, device=str(device))
    torch.manual_seed(0)
    model = create_model(arch, num_classes=100)
    reset_peak(device)
    res = fit(model, data, recipe, val_split=None, progress=False)
    train_ips = res.history[-1]["images_per_sec"]  # the last epoch: after warm-up (and compilation)
    predict(model, x[:500], MEAN, STD, device=device, channels_last=recipe["channels_last"])
    with _Clock(device) as clock:
        predict(model, x[:n], MEAN, STD, device=device, channels_last=recipe["channels_last"])
    return {"train_images_per_sec": train_ips, "eval_images_per_sec": n / clock.seconds,
            "peak_mib": peak_memory(device),
            "recipe": {k: recipe[k] for k in ("precision", "channels_last", "compile")}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", help="sipa_baseline_32 and/or sipa_baseline (default: both)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 200 on a GPU, 8 on a CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 50 on a GPU, 3 on a CPU)")
    ap.add_argument("--batch", type=int, default=None, help="default: 512 on a GPU, 128 on a CPU")
    ap.add_argument("--workers", type=int, default=None, help="reference DataLoader workers (default: CPUs - 1)")
    ap.add_argument("--fast", default="", help="comma list: compile, nchw, fp32 (project path options)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (200 if cuda else 8)
    warmup = args.warmup or (50 if cuda else 3)
    batch = args.batch or (512 if cuda else 128)

    workers = args.workers if args.workers is not None else max(0, (os.cpu_count() or 1) - 1)
    fast = {f for f in args.fast.split(",") if f}
    if cuda:
        torch.backends.cudnn.benchmark = True
    x, y = synthetic(max(steps, warmup) * batch + batch)
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'CPU'}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, batch {batch}, {steps} timed steps after {warmup} warm-up")
    results = []
    for arch in args.arch or ["sipa_baseline_32", "sipa_baseline"]:
        ref = None if args.skip_reference else reference(arch, x, y, steps, warmup, batch, workers, device)
        ours = project(arch, x, y, steps, warmup, batch, device, fast)
        row = {"arch": arch, "reference": ref, "project": ours}
        if ref:
            row["train_speedup"] = ours["train_images_per_sec"] / ref["train_images_per_sec"]
            row["eval_speedup"] = ours["eval_images_per_sec"] / ref["eval_images_per_sec"]
        results.append(row)
        for name, r in (("reference", ref), ("project", ours)):
            if r:
                print(f"{arch:<17} {name:<9} train {r['train_images_per_sec']:>10,.0f} img/s   eval "
                      f"{r['eval_images_per_sec']:>10,.0f} img/s   peak {r['peak_mib']:,.0f} MiB")
        if ref:
            print(f"{arch:<17} speed-up  train x{row['train_speedup']:.2f}   eval x{row['eval_speedup']:.2f}")
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
