"""Training and evaluation throughput of the engine on synthetic data.

    python benchmarks/train_speed.py --arch sipa_baseline --images 5000 --epochs 2 [--precision bf16]
    python benchmarks/train_speed.py --recipe-from profiles/paper.yaml --precision bf16 --compile

``--recipe-from FILE`` takes the improving stage's final recipe of a params file (the paper's:
its augmentation policy, mixup, ghost BatchNorm, batch 128) and changes only the speed options
given here (precision, channels_last, compile and its mode, device, determinism).

The data set is random uint8 images held on the device, so the number
measures the engine's step (batching, augmentation, forward, backward,
update), not decoding. The first epoch is warm-up; images/s is from the
later epochs, timed with device synchronisation. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipa_core.data.prepared import PreparedData  # noqa: E402
from sipa_core.models import create_model  # noqa: E402
from sipa_core.pipeline import resolved_trainings  # noqa: E402
from sipa_core.train import configure_model, default_recipe, fit, predict, resolve_device  # noqa: E402


def synthetic(n: int, classes: int, size: int = 32) -> PreparedData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return PreparedData(x, y, x[:0], y[:0], x[:2000], y[:2000], [str(i) for i in range(classes)],
                        [0.5] * 3, [0.25] * 3, {"source": "synthetic"})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sipa_baseline")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=2, help="the first is warm-up")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--nchw", action="store_true", help="NCHW memory format (default: channels_last)")
    p.add_argument("--augment", default="none")
    p.add_argument("--device", default="auto")
    p.add_argument("--nondeterministic", action="store_true", help="allow fast nondeterministic kernels")
    p.add_argument("--recipe-from", metavar="FILE", help="the improving stage's final recipe of this params file")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="reduce-overhead: CUDA graphs")
    p.add_argument("--augment-off", action="store_true", help="with --recipe-from: no augmentation policy")
    p.add_argument("--parse-only", action="store_true", help="build the recipe, train nothing (dry runs)")
    args = p.parse_args()

    data = synthetic(args.images, 100)
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=100)
    speed = dict(epochs=args.epochs, precision=args.precision, channels_last=not args.nchw, device=args.device,
                 deterministic=not args.nondeterministic, compile=args.compile, compile_mode=args.compile_mode)
    if args.recipe_from:
        final = resolved_trainings(args.recipe_from)["improve"]["final"]
        if not isinstance(final, dict):
            raise SystemExit(f"{args.recipe_from}: improve is greedy; its final recipe is known only after the trials")
        recipe = default_recipe(**{**final["recipe"], **speed, "stabilize_epochs": 0, "warmup_epochs": 0,
                                    **({"augment": "none"} if args.augment_off else {})})
        model = configure_model(model, recipe)
    else:
        recipe = default_recipe(batch_size=args.batch, augment=args.augment, **speed)
    if args.parse_only:
        print(json.dumps({"recipe_ok": True, "compile": recipe["compile"], "compile_mode": recipe["compile_mode"]}))
        return
    res = fit(model, data, recipe, val_split=None, progress=False)
    timed = res.history[1:] or res.history
    train_ips = sum(r["images_per_sec"] for r in timed) / len(timed)

    device = resolve_device(args.device)
    x = data.test_x
    predict(model, x[:500], data.mean, data.std, device=device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    predict(model, x, data.mean, data.std, device=device, channels_last=recipe["channels_last"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    eval_ips = len(x) / (time.perf_counter() - t0)
    print(json.dumps({"arch": args.arch, "device": str(device), "precision": args.precision,
                      "channels_last": recipe["channels_last"], "batch": recipe["batch_size"], "images": args.images,
                      "augment": recipe["augment"], "compile": args.compile and args.compile_mode,
                      "train_images_per_sec": round(train_ips, 1), "eval_images_per_sec": round(eval_ips, 1),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
