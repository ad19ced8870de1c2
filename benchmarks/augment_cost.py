"""Cost of the authors' per-image CIFAR-100 policy against the grouped torchvision one.

Both run on the same uint8 batches on the chosen device: `sipa_cifar100`
(every image its own sub-policy, batched per op and sign) and torchvision's
AutoAugment applied to groups of `--group` images (one sampled op per group).
Prints images per second of each and their ratio (timed after warm-up,
synchronised on GPUs).

    python benchmarks/augment_cost.py [--batch 128] [--size 32] [--steps 100] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from sipa_core.train.augment import make_policy


def images_per_sec(policy, x, gen, steps: int, device) -> float:
    for _ in range(3):  # warm-up
        policy(x, gen)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        policy(x, gen)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
    gen = torch.Generator().manual_seed(0)
    grouped = images_per_sec(make_policy("autoaugment", args.group), x, gen, args.steps, device)
    per_image = images_per_sec(make_policy("sipa_cifar100"), x, gen, args.steps, device)
    print(f"device {device}, batch {args.batch}, {args.size}x{args.size}, {args.steps} timed steps, "
          f"{torch.get_num_threads()} threads")
    print(f"torchvision AutoAugment, groups of {args.group}: {grouped:,.0f} img/s")
    print(f"sipa_cifar100, per image:          {per_image:,.0f} img/s")
    print(f"per-image cost: x{grouped / per_image:.2f} the grouped policy's time")


if __name__ == "__main__":
    main()
