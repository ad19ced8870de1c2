"""A compact image subset in one file: the JPEG bytes of chosen images of an
image folder, as they were (no re-encoding), with class names, labels, file
names and provenance. ``datasets/cifar10-subset.pt`` (built by
``scripts/build_cifar10_subset.py``) ships with the repository so the quick
profile runs anywhere, without a network; ``prepare.source: cifar10_subset``
reads it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sipa_core.errors import SipaError
from sipa_core.io import atomic_torch_save, load_checkpoint

FORMAT = "sipa-jpeg-subset"
DEFAULT_FILE = "datasets/cifar10-subset.pt"


def pack(parts: dict[str, list[tuple[str, int, bytes]]], classes: list[str], provenance: dict, out) -> Path:
    """Write ``parts`` ({"train"/"test": [(file name, label, jpeg bytes), ...]}) as one subset file."""
    obj = {"format": FORMAT, "classes": list(classes), "provenance": provenance}
    for part, items in parts.items():
        blobs = [b for _, _, b in items]
        obj[part] = {"names": [n for n, _, _ in items], "labels": torch.tensor([y for _, y, _ in items]),
                     "offsets": torch.tensor(np.cumsum([0] + [len(b) for b in blobs]), dtype=torch.int64),
                     "jpeg": torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)}
    return atomic_torch_save(out, obj)


def open_subset(path, where: str) -> dict:
    """The subset file at ``path``, checked; any problem names ``prepare.root``."""
    path = Path(path)
    if not path.is_file():
        raise SipaError(f"{where}.root: subset file {path} not found (scripts/build_cifar10_subset.py builds it)")
    try:
        obj = load_checkpoint(path, "image subset")
    except SipaError as err:
        raise SipaError(f"{where}.root: {err}") from None
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT and "train" in obj and "test" in obj):
        raise SipaError(f"{where}.root: {path} is not a {FORMAT} file")
    return obj


def decode(part: dict, indices: list[int], image_size: int | None, path) -> torch.Tensor:
    """uint8 N x 3 x H x W of the chosen images (resized to ``image_size`` when given)."""
    jpeg, offsets = part["jpeg"].numpy().tobytes(), part["offsets"].tolist()
    images = []
    for i in indices:
        try:
            with Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]])) as im:
                img = im.convert("RGB")
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
            raise SipaError(f"{path}: image {part['names'][i]} cannot be read ({err})") from None
        if image_size is not None:
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        images.append(np.asarray(img))
    if len({im.shape for im in images}) > 1:
        raise SipaError(f"{path}: images differ in size; set prepare.image_size to resize them all")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
