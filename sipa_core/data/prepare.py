"""The ``prepare`` stage: one compact, deterministic file with train/val/test.

``prepare(cfg)`` reads a source (see ``sources``), holds out a validation set
stratified by class, computes the per-channel normalisation from the training
split only, and writes everything as uint8 tensors in a single torch file that
loads with ``weights_only=True``. The same parameters and the same data give
the same tensors.
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import torch

from sipa_core.data.prepared import FORMAT, SPLITS, VERSION
from sipa_core.data.sources import SOURCES, plan_source
from sipa_core.errors import SipaError
from sipa_core.io import atomic_torch_save, publish_metrics, publishing
from sipa_core.paths import path_fields, read_params
from sipa_core.params import Field, check_section
from sipa_core.runtime import provenance
from sipa_core.stage_runner import Stage



def _non_empty(value: str) -> str | None:
    return "must not be empty" if not value.strip() else None


def _class_list(value: list) -> str | None:
    if not value:
        return "must list at least one class name, or be null for all classes"
    bad = [v for v in value if not isinstance(v, str)]
    return f"class names must be strings, got {bad[0]!r}" if bad else None


PREPARE_SCHEMA = {
    "source": Field(str, "cifar10_subset", choices=SOURCES,
                    help="where the images come from (cifar10_subset: the CIFAR-10 subset in the repository)"),
    "root": Field(str, None, nullable=True, check=_non_empty,
                  help="cifar: folder holding the extracted archive (null: data/raw); imagefolder: the folder "
                       "itself; cifar10_subset: the subset file (null: datasets/cifar10-subset.pt)"),
    "download": Field(bool, False, help="cifar: download the official python version when no official files "
                                        "are under root (needs a network); false: read what is there, offline"),
    "labels": Field(str, "fine", choices=("fine", "coarse"),
                    help="cifar100: the 100 fine classes, or the 20 coarse superclasses"),
    "val_size": Field(int, 500, min=0, help="training images held out for validation, stratified; 0 = none"),
    "images_per_class": Field(int, 250, nullable=True, min=1, help="at most this many training images per class"),
    "test_images_per_class": Field(int, 200, nullable=True, min=1, help="at most this many test images per class"),
    "classes": Field(list, None, nullable=True, check=_class_list, help="class names to keep; null = all"),
    "image_size": Field(int, None, nullable=True, min=8, help="resize every image to this square size"),
    "seed": Field(int, 0, min=0, max=2**63 - 1, help="seeds the subset choice and the validation split"),
    **path_fields('prepare'),
}

# The parameters that decide the content of the prepared file (stored in it).
_DATA_KEYS = ("source", "root", "classes", "images_per_class", "test_images_per_class",
              "image_size", "val_size", "seed")


def prepare(cfg: Mapping, *, params_file: str | os.PathLike = "params.yaml",
            progress: bool | None = None) -> dict:
    """Build the prepared file and the metrics file from a ``prepare`` section.

    ``cfg`` is checked against ``PREPARE_SCHEMA`` (defaults filled in) and the
    split is planned before any image is decoded, so mistakes fail fast.
    ``params_file`` only names the file in messages. Returns the metrics.
    """
    started = time.time()
    cfg = check_section(cfg, PREPARE_SCHEMA, file=params_file, section="prepare")
    where = f"{params_file}: prepare"
    cfg = {**cfg, "root": _root(cfg, where)}
    plan = plan_source(
        cfg["source"], cfg["root"], download=cfg["download"], classes=cfg["classes"],
        images_per_class=cfg["images_per_class"], test_images_per_class=cfg["test_images_per_class"],
        image_size=cfg["image_size"], seed=cfg["seed"], labels=cfg["labels"], where=where,
    )
    train_idx, val_idx = split_train_val(plan.train_y, len(plan.classes), cfg["val_size"], cfg["seed"], where)
    try:
        raw = plan.decode(progress)
    except SipaError as err:  # an unreadable image: name the key that pointed at it
        raise SipaError(f"{where}.root: {err}") from None

    data = {
        "format": FORMAT,
        "version": VERSION,
        "train_x": raw.train_x[train_idx].contiguous(),
        "train_y": raw.train_y[train_idx].contiguous(),
        "val_x": raw.train_x[val_idx].contiguous(),
        "val_y": raw.train_y[val_idx].contiguous(),
        "test_x": raw.test_x.contiguous(),
        "test_y": raw.test_y.contiguous(),
        "classes": list(raw.classes),
    }
    data["mean"], data["std"] = channel_stats(data["train_x"])
    data["source"] = {key: cfg[key] for key in _DATA_KEYS}
    if cfg["source"] == "cifar100":  # the only source with a choice of labels
        data["source"]["labels"] = cfg["labels"]
    with publishing(cfg["metrics"]):
        atomic_torch_save(cfg["out"], data)
    metrics = {**_metrics(data), **plan.record, **provenance(seed=cfg["seed"], device="cpu", started=started)}
    publish_metrics(cfg["metrics"], metrics, cfg["info"])
    return metrics


DEFAULT_ROOTS = {"cifar100": "data/raw", "cifar10": "data/raw", "cifar10_subset": "datasets/cifar10-subset.pt"}


def _root(cfg: Mapping, where: str) -> str:
    """``prepare.root``, or the source's own default location."""
    if cfg["root"] is not None:
        return cfg["root"]
    if cfg["source"] not in DEFAULT_ROOTS:
        raise SipaError(f"{where}.root: source {cfg['source']} needs the folder (ROOT/train/<class>/*, "
                        f"ROOT/test/<class>/*)")
    return DEFAULT_ROOTS[cfg["source"]]


def stratified_counts(class_sizes: list[int], val_size: int) -> list[int]:
    """How many of each class to hold out: proportional to class size
    (equal for balanced classes), rounded by largest remainder, and never a
    class's last training image. Requires ``val_size <= sum - len``."""
    total = sum(class_sizes)
    quotas = [val_size * n / total for n in class_sizes]
    counts = [int(q) for q in quotas]
    # Hand out what rounding down left over, largest remainder first (ties:
    # lower class index), one per class per round, skipping full classes.
    order = sorted(range(len(counts)), key=lambda c: (counts[c] - quotas[c], c))
    left = val_size - sum(counts)
    while left > 0:
        room = [c for c in order if counts[c] < class_sizes[c] - 1][:left]
        if not room:
            raise ValueError(f"stratified_counts: {val_size} does not fit in classes of sizes {class_sizes}")
        for c in room:
            counts[c] += 1
        left -= len(room)
    return counts


def split_train_val(labels: torch.Tensor, num_classes: int, val_size: int, seed: int,
                    where: str = "prepare") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (ascending) of the training and validation images, stratified by class."""
    members = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    sizes = [len(m) for m in members]
    pool = sum(sizes)
    if val_size > pool - num_classes:
        raise SipaError(
            f"{where}.val_size: {val_size} is too large for the {pool} training images selected "
            f"({num_classes} classes): at most {pool - num_classes}, so every class keeps a training image"
        )
    gen = torch.Generator().manual_seed(seed)
    val = [m[torch.randperm(len(m), generator=gen)[:k]] for m, k in zip(members, stratified_counts(sizes, val_size))]
    val_idx = torch.sort(torch.cat(val)).values if val else torch.empty(0, dtype=torch.int64)
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[val_idx] = True
    return torch.nonzero(~is_val).flatten(), val_idx


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of ``x / 255`` for uint8 ``N x C x H x W``.

    Counted from a histogram of the 256 byte values: exact in float64 and
    without a float copy of the whole set (45,000 CIFAR images would need 1.1 GB).
    """
    if x.dtype != torch.uint8 or x.dim() != 4 or x.numel() == 0:
        raise ValueError("channel_stats: expected a non-empty uint8 N x C x H x W tensor")
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / n
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return means, stds


def _metrics(data: dict) -> dict:
    height, width = data["train_x"].shape[2:]
    return {
        **{f"{s}_images": len(data[f"{s}_y"]) for s in SPLITS},
        "num_classes": len(data["classes"]),
        "image_height": int(height),
        "image_width": int(width),
        "mean": dict(zip("rgb", data["mean"])),
        "std": dict(zip("rgb", data["std"])),
    }


def read_config(params_path: str | os.PathLike) -> dict:
    """The checked ``prepare`` section of a params file."""
    return check_section(read_params(params_path).get("prepare"), PREPARE_SCHEMA, file=params_path, section="prepare")


def summary(cfg: dict, m: dict) -> str:
    return (f"prepare: {m['train_images']} train / {m['val_images']} val / {m['test_images']} test images, "
            f"{m['num_classes']} classes, {m['image_height']}x{m['image_width']} -> {cfg['out']}")


def inactive(cfg: dict, raw: dict) -> list[str]:
    """Keys set in the file that the chosen source does not use."""
    out = [f"prepare.download: source {cfg['source']} reads local files only"] \
        if "download" in raw and cfg["source"] not in ("cifar10", "cifar100") else []
    return out + ([f"prepare.labels: source {cfg['source']} has one kind of label (cifar100 has fine and coarse)"]
                  if "labels" in raw and cfg["source"] != "cifar100" else [])


STAGE = Stage("prepare", __doc__, read_config, prepare, summary, inactive, trains=False)
