"""Engine parity: the project's network trained by the engine and by a plain PyTorch loop.

    python benchmarks/accuracy_parity.py                 # engine vs plain loop, 5 seeds (~35 min)
    python benchmarks/accuracy_parity.py --ablation      # also: init, BatchNorm eps, dropout (engine)
    python benchmarks/accuracy_parity.py --ablation --variants 1 4   # only some of them
    python benchmarks/accuracy_parity.py --trainers "plain loop, engine's batches"   # the gap's halves

Same network object and initial weights for both; the same 5,000 training
images of the shipped CIFAR-10 subset (``datasets/cifar10-subset.pt``, 500 per
class) and its 2,000 test images; the same SGD, per-step cosine schedule,
epochs, label smoothing, crop (4 px zero padding) and flip. The plain loop is
what a PyTorch user writes: a Dataset of PIL images, torchvision transforms,
a DataLoader, ``F.cross_entropy(label_smoothing=...)``. The engine keeps the
images on the device as uint8 tensors and augments whole batches.
``--trainers`` picks who trains the defaults; two hybrids split a gap between
the engine and the plain loop: the plain loop's optimizer, schedule and loss
fed by the engine's data path (uint8 tensors, batched crop and flip on one
generator), its input channels_last as the engine's or NCHW as the plain
loop's.

``--ablation`` trains, with the engine and the first seed, variants of the
project's defaults: (1) the EfficientNet reference's initialisation, (2) an
earlier conv initialisation of this project, (3) BatchNorm eps 1e-5, (4) no
dropout / drop-connect, (5) 3 and 4 together (with PyTorch's default init, an
independent implementation), (6) the engine without channels_last, to see
which of them costs accuracy (or speed) at this short budget. A benchmark, not a test: each
training takes about 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipa_core.data.prepared import PreparedData  # noqa: E402
from sipa_core.data.prepare import channel_stats  # noqa: E402
from sipa_core.data.sources import load_source  # noqa: E402
from sipa_core.models import create_model  # noqa: E402
from sipa_core.models.efficientnet import INIT_RULES  # noqa: E402
from sipa_core.train import configure_model, default_recipe, evaluate, fit  # noqa: E402
from sipa_core.train.augment import normalize, random_crop, random_flip  # noqa: E402

ARCH = "sipa_baseline_32"
RECIPE = dict(batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
              label_smoothing=0.1, crop_padding=4, flip=True)


def load_data(root: str) -> PreparedData:
    raw = load_source("cifar10_subset", root, progress=False)
    mean, std = channel_stats(raw.train_x)
    empty_x, empty_y = raw.train_x[:0], raw.train_y[:0]
    return PreparedData(raw.train_x, raw.train_y, empty_x, empty_y, raw.test_x, raw.test_y, raw.classes,
                        mean, std, {"source": "cifar10_subset"})


class UInt8Images(Dataset):
    """PIL images from a uint8 tensor, through torchvision transforms (what a plain loop reads)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(transforms.functional.to_pil_image(self.x[i])), int(self.y[i])


def plain_loop(model: nn.Module, data: PreparedData, epochs: int, seed: int, workers: int) -> float:
    """Train with a textbook PyTorch loop; returns seconds."""
    torch.manual_seed(seed)
    tf = transforms.Compose([transforms.RandomCrop(32, padding=RECIPE["crop_padding"]),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(data.mean, data.std)])
    loader = DataLoader(UInt8Images(data.train_x, data.train_y, tf), batch_size=RECIPE["batch_size"],
                        shuffle=True, drop_last=True, num_workers=workers)
    opt = torch.optim.SGD(model.parameters(), lr=RECIPE["lr"], momentum=RECIPE["momentum"],
                          weight_decay=RECIPE["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb, label_smoothing=RECIPE["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - t0


def plain_loop_engine_batches(model: nn.Module, data: PreparedData, epochs: int, seed: int, workers: int,
                              channels_last: bool = True) -> float:
    """The plain loop's optimizer, schedule and loss fed by the engine's data path (uint8 tensors,
    batched crop and flip on one generator, normalised channels_last): splits a gap between the
    two trainers into data path and training step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (data.mean, data.std))
    bs, n = RECIPE["batch_size"], len(data.train_y)
    steps = n // bs
    opt = torch.optim.SGD(model.parameters(), lr=RECIPE["lr"], momentum=RECIPE["momentum"],
                          weight_decay=RECIPE["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for step in range(steps):
            idx = perm[step * bs:(step + 1) * bs]
            xb = random_flip(random_crop(data.train_x[idx], RECIPE["crop_padding"], gen), gen)
            loss = F.cross_entropy(model(normalize(xb, mean, std, channels_last)), data.train_y[idx],
                                   label_smoothing=RECIPE["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - t0


TRAINERS = {"plain loop": plain_loop, "plain loop, engine's batches": plain_loop_engine_batches,
            "plain loop, engine's batches in NCHW": functools.partial(plain_loop_engine_batches,
                                                                      channels_last=False)}


def engine_recipe(epochs: int, seed: int, **overrides) -> dict:
    return default_recipe(**RECIPE, epochs=epochs, seed=seed, device="cpu", **overrides)


def efficientnet_init(model: nn.Module) -> nn.Module:
    """The EfficientNet reference's rule (the spec's ``init: efficientnet``)."""
    INIT_RULES["efficientnet"](model)
    return model


def fan_out_over_all_channels(model: nn.Module) -> nn.Module:
    """An earlier init of this project: torch's kaiming_normal_(mode="fan_out"), whose fan-out of a
    depthwise conv counts every output channel."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
    return model


def bn_eps(model: nn.Module, eps: float = 1e-5) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = eps
    return model


VARIANTS = {  # name: (change to the model, engine recipe overrides)
    "project defaults": (lambda m: m, {}),
    "EfficientNet reference init (He normal, fan-out per group)": (efficientnet_init, {}),
    "conv init kaiming_normal_ fan_out (depthwise over all channels)": (fan_out_over_all_channels, {}),
    "BatchNorm eps 1e-5": (bn_eps, {}),
    "no dropout, no drop-connect": (lambda m: m, dict(dropout=0.0, drop_connect=0.0)),
    "BatchNorm eps 1e-5 and no dropout (an independent implementation)": (bn_eps, dict(dropout=0.0,
                                                                                      drop_connect=0.0)),
    "NCHW memory format (speed only)": (lambda m: m, dict(channels_last=False)),
}


def one_run(trainer: str, variant: str, data: PreparedData, epochs: int, seed: int, workers: int) -> dict:
    torch.manual_seed(seed)
    change, overrides = VARIANTS[variant]
    recipe = engine_recipe(epochs, seed, **overrides)
    model = configure_model(change(create_model(ARCH, num_classes=data.num_classes)), recipe)
    if trainer == "engine":
        seconds = fit(model, data, recipe, val_split=None, progress=False).seconds
    else:
        seconds = TRAINERS[trainer](model, data, epochs, seed, workers)
    row = dict(trainer=trainer, variant=variant, seed=seed, test_acc=evaluate(model, data, "test"),
               seconds=round(seconds, 1))
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["trainer"], r["variant"]), []).append(r)
    lines = ["| trainer | variant | seeds | test accuracy (mean) | per seed | train seconds (mean) |",
             "|---|---|---|---|---|---|"]
    for (trainer, variant), rs in groups.items():
        accs = [r["test_acc"] for r in rs]
        lines.append(f"| {trainer} | {variant} | {len(rs)} | {100 * statistics.mean(accs):.2f}% | "
                     f"{', '.join(f'{100 * a:.2f}' for a in accs)} | "
                     f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="datasets/cifar10-subset.pt")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="five by default: two resolve no gap finer than about 2.5 pp (README)")
    p.add_argument("--workers", type=int, default=0, help="plain loop: DataLoader worker processes")
    p.add_argument("--trainers", nargs="+", default=["engine", "plain loop"],
                   choices=["engine", *TRAINERS], help="which trainers train the project defaults")
    p.add_argument("--ablation", action="store_true", help="also train the variants (engine, first seed)")
    p.add_argument("--variants", nargs="+", type=int, default=None,
                   help="with --ablation: only these variants (1-based, in the order of VARIANTS after the defaults)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    data = load_data(args.root)
    torch.use_deterministic_algorithms(True)  # what the engine's recipe sets, for every trainer alike
    rows = []
    for seed in args.seeds:
        for trainer in args.trainers:
            rows.append(one_run(trainer, "project defaults", data, args.epochs, seed, args.workers))
    if args.ablation:
        chosen = list(VARIANTS)[1:]
        chosen = [chosen[i - 1] for i in args.variants] if args.variants else chosen
        for variant in chosen:
            rows.append(one_run("engine", variant, data, args.epochs, args.seeds[0], args.workers))
    print(f"\n{ARCH}, {len(data.train_y)} training / {len(data.test_y)} test images, {args.epochs} epochs, "
          f"torch threads {torch.get_num_threads()}\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
