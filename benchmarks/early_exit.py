"""Wall-clock cost of early exit next to its op-count saving.

    python benchmarks/early_exit.py --checkpoint models/accelerate.pt --data data/prepared/dataset.pt
    python benchmarks/early_exit.py --arch sipa_baseline --exit-after 4 --exit-ratio 0.32   # synthetic

Measures latency at batch 1 and throughput at a large batch for the main
network alone and for adaptive inference (exit, then the rest only for the
samples that stay), after warm-up, with device synchronisation. Op savings
(MicroNet count) and wall-clock savings are different things: the exit's
small kernels, the confidence test and the gather of the remaining samples
cost time that the op count does not see; both are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sipa_core.accelerate import load_early_exit
from sipa_core.accelerate.exits import EarlyExitNetwork, exit_config, exit_cost
from sipa_core.data.prepared import load_prepared
from sipa_core.models import create_model
from sipa_core.train import normalized


def timed(fn, repeats: int, device) -> float:
    """Median seconds per call, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="an accelerate-stage checkpoint (its exit and threshold)")
    ap.add_argument("--data", help="prepared data set: time on its test images (default: random images)")
    ap.add_argument("--arch", default="sipa_baseline_32")
    ap.add_argument("--exit-after", type=int, default=4)
    ap.add_argument("--exit-ratio", type=float, default=0.32, help="synthetic: threshold set so this fraction exits")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.checkpoint:
        net, record = load_early_exit(args.checkpoint)
        threshold = record.threshold
    else:
        main_net = create_model(args.arch).eval()
        net = EarlyExitNetwork(main_net, exit_config(main_net, args.exit_after)).eval()
        with torch.no_grad():  # a random exit is near-uniform: spread its confidences so a threshold splits them
            net.exit[-1].weight.mul_(50)
        threshold = None
    size = net.main.spec["image_size"]
    if args.data:
        data = load_prepared(args.data)
        x = normalized(data.test_x[: args.batch], data.mean, data.std)
    else:
        x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    net, x = net.to(device), x.to(device)
    with torch.no_grad():
        conf = F.softmax(net(x), 1).amax(1)
    if threshold is None:  # synthetic: pick the threshold that lets the asked fraction exit
        threshold = float(conf.quantile(1 - args.exit_ratio)) if args.exit_ratio > 0 else 1.0
    ratio = float((conf > threshold).float().mean())
    cost = exit_cost(net.cpu(), (3, size, size))
    net.to(device)
    s = cost.summary(ratio)
    op_saving = 1 - s["ops"] / cost.full_ops

    rows = []
    with torch.no_grad():
        for batch in (1, len(x)):
            xb = x[:batch]
            t_main = timed(lambda xb=xb: net.main(xb), args.repeats, device)
            t_exit = timed(lambda xb=xb: net.adaptive(xb, threshold), args.repeats, device)
            rows.append((batch, t_main, t_exit))
    print(f"device {device}, threads {torch.get_num_threads()}, {net.main.spec.get('name') or 'checkpoint'} "
          f"input {size}x{size}, exit after block {net.position}, threshold {threshold:.3f}")
    print(f"exit ratio on these images: {ratio:.3f}; expected ops {s['ops'] / 1e6:.3f}M vs {cost.full_ops / 1e6:.3f}M "
          f"without exit: op saving {op_saving:+.1%} (exit module {cost.exit_ops / 1e6:.3f}M ops)")
    for batch, t_main, t_exit in rows:
        if batch == 1:
            # At batch 1 the single sample exits or not; the latency is the mean over both cases,
            # weighted by the exit ratio.
            with torch.no_grad():
                h = net.features(x[:1])
                t_path = timed(lambda: net.exit(net.features(x[:1])), args.repeats, device)
                t_rest = timed(lambda h=h: net.rest(h), args.repeats, device)
            expected = ratio * t_path + (1 - ratio) * (t_path + t_rest)
            print(f"batch 1: main {t_main * 1e3:.2f} ms; exit path {t_path * 1e3:.2f} ms, exit+rest "
                  f"{(t_path + t_rest) * 1e3:.2f} ms, expected {expected * 1e3:.2f} ms: wall-clock saving "
                  f"{1 - expected / t_main:+.1%}")
        else:
            print(f"batch {batch}: main {batch / t_main:,.0f} img/s, adaptive {batch / t_exit:,.0f} img/s: "
                  f"wall-clock saving {1 - t_exit / t_main:+.1%}")


if __name__ == "__main__":
    main()
