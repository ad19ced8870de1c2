"""The prepared data set: the one file the ``prepare`` stage writes and every other stage reads.

A torch file (``weights_only`` loading) holding uint8 images ``N x 3 x H x W`` and int64
labels for the train, validation and test splits, the class names, the per-channel
normalisation of the training split, and the ``source`` record of what was read. This
module is all a training stage imports of ``sipa_core.data``: an edit to a data source
(``sources.py``, ``cifar.py``) re-runs the prepare stage only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sipa_core.errors import SipaError
from sipa_core.io import load_checkpoint

FORMAT = "sipa-prepared"
VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class PreparedData:
    """A prepared data set: uint8 images ``N x 3 x H x W`` and int64 labels per split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: list[float]  # per channel, of train pixels / 255
    std: list[float]
    source: dict

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width)."""
        return tuple(self.train_x.shape[2:])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Read a file written by ``prepare``; anything else is a SipaError naming it."""
    path = Path(path)
    obj = load_checkpoint(path, what="prepared data")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise SipaError(f"{path}: not a {FORMAT} data file (the prepare stage writes one)")
    if obj.get("version") != VERSION:
        raise SipaError(f"{path}: {FORMAT} version {obj.get('version')!r} is not supported "
                        f"(expected {VERSION}); rerun the prepare stage")
    fields = [f for f in PreparedData.__dataclass_fields__]
    missing = [f for f in fields if f not in obj]
    if missing:
        raise SipaError(f"{path}: {FORMAT} file lacks {', '.join(missing)}; rerun the prepare stage")
    data = PreparedData(**{f: obj[f] for f in fields})
    problem = _check_prepared(data)
    if problem:
        raise SipaError(f"{path}: {FORMAT} file is inconsistent: {problem}; rerun the prepare stage")
    return data


def _check_prepared(data: PreparedData) -> str | None:
    if not (isinstance(data.classes, list) and data.classes and all(isinstance(c, str) for c in data.classes)):
        return "classes must be a non-empty list of names"
    for stats in ("mean", "std"):
        value = getattr(data, stats)
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, float) for v in value)):
            return f"{stats} must be 3 numbers"
    shape = None
    for split in SPLITS:
        x, y = data.split(split)
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            return f"{split}_x must be a uint8 N x 3 x H x W tensor"
        if not (isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.shape == x.shape[:1]):
            return f"{split}_y must be int64 labels, one per image of {split}_x"
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < len(data.classes)):
            return f"{split}_y holds labels outside 0..{len(data.classes) - 1}"
        if shape is not None and x.shape[2:] != shape:
            return f"{split}_x images are {tuple(x.shape[2:])}, train_x images are {tuple(shape)}"
        shape = x.shape[2:]
    return None
