"""Data sources: raw decoded images and labels for the ``train`` and ``test`` parts.

A source is read in two steps so that a quick run only pays for what it uses
and every mistake surfaces before the slow part:

* ``plan_source`` checks the source, lists what it holds, applies the subset
  controls (``classes``, ``images_per_class``, ``test_images_per_class``) and
  returns a ``SourcePlan`` with the classes and the labels of the chosen
  images, without decoding any image;
* ``SourcePlan.decode`` then decodes only the chosen images into uint8
  tensors ``N x 3 x H x W``.

Sources: ``cifar100`` and ``cifar10`` (the official binary or python version, read
offline by ``cifar.py``; downloaded only when ``download`` asks), ``imagefolder``
(``root/train/<class>/<image>``, ``root/test/<class>/<image>``) and ``cifar10_subset``
(the CIFAR-10 subset shipped in the repository).
"""

from __future__ import annotations

import difflib
import hashlib
import multiprocessing
import os
import socket
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sipa_core.data import cifar
from sipa_core.data.subset import decode, open_subset
from sipa_core.errors import SipaError

SOURCES = ("cifar10_subset", "cifar100", "cifar10", "imagefolder")
PARTS = ("train", "test")

DOWNLOAD_TIMEOUT_S = 20  # per socket operation; a dead network fails fast
DECODE_CHUNK = 500  # images per task sent to a decode worker
PARALLEL_MIN_IMAGES = 1000  # below this a pool costs more than it saves

_LAYOUT = "root/train/<class>/<image> and root/test/<class>/<image>"

# torchvision's class (for a download asked for), display name.
_CIFAR = {"cifar100": ("CIFAR100", "CIFAR-100"), "cifar10": ("CIFAR10", "CIFAR-10")}


@dataclass
class RawData:
    """Decoded images of both parts: uint8 ``N x 3 x H x W`` and int64 labels."""

    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass
class SourcePlan:
    """What a source will deliver, known before any image is decoded.

    ``train_y``/``test_y`` are the labels (indices into ``classes``) of the
    chosen images in the order ``decode`` returns them.
    """

    classes: list[str]
    train_y: torch.Tensor
    test_y: torch.Tensor
    decode_part: Callable[[str, bool | None], torch.Tensor] = field(repr=False)
    record: dict = field(default_factory=dict)  # what was read, for the run information (CIFAR: files, digests)

    def decode(self, progress: bool | None = None) -> RawData:
        """Decode the chosen images; ``progress=None`` shows a bar only on a terminal."""
        return RawData(
            classes=list(self.classes),
            train_x=self.decode_part("train", progress),
            train_y=self.train_y,
            test_x=self.decode_part("test", progress),
            test_y=self.test_y,
        )


def plan_source(
    source: str,
    root: str | os.PathLike,
    *,
    download: bool = True,
    classes: Sequence[str] | None = None,
    images_per_class: int | None = None,
    test_images_per_class: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    labels: str = "fine",
    where: str = "prepare",
) -> SourcePlan:
    """Open ``source`` and choose the images to use; decodes nothing.

    ``where`` prefixes messages about parameters (e.g. ``"params.yaml: prepare"``
    gives ``"params.yaml: prepare.classes: ..."``).
    """
    per_class = {"train": images_per_class, "test": test_images_per_class}
    if source in _CIFAR:
        files = _load_cifar(source, Path(root), download, labels, where)
        return _plan_cifar(files, classes, per_class, image_size, seed, where)
    if source == "imagefolder":
        return _plan_imagefolder(Path(root), classes, per_class, image_size, seed, where)
    if source == "cifar10_subset":
        return _plan_subset(Path(root), classes, per_class, image_size, seed, where)
    raise SipaError(f"{where}.source: {source!r} is not one of {', '.join(SOURCES)}")


def load_source(source: str, root: str | os.PathLike, *, progress: bool | None = None, **options) -> RawData:
    """``plan_source`` then ``decode``: the chosen images of both parts."""
    return plan_source(source, root, **options).decode(progress)


# --------------------------------------------------------------------------
# Choosing classes and images (shared by all sources)


def choose_classes(available: Sequence[str], wanted: Sequence[str] | None, where: str) -> list[str]:
    """The chosen class names, in the source's own order (so labels do not
    depend on how the list in params.yaml is ordered)."""
    if wanted is None:
        return list(available)
    seen = set()
    for name in wanted:
        if name not in available:
            near = difflib.get_close_matches(str(name), list(available), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            shown = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "")
            raise SipaError(f"{where}.classes: unknown class {name!r}{hint}; the source has: {shown}")
        if name in seen:
            raise SipaError(f"{where}.classes: class {name!r} is listed twice")
        seen.add(name)
    return [name for name in available if name in seen]


def pick(n: int, k: int | None, seed: int, part: str, name: str) -> list[int]:
    """Positions (ascending) of at most ``k`` of the ``n`` items of one class.

    A random choice rather than the first ``k`` files, because file order often
    follows capture order. The generator is seeded from (seed, part, class
    name), so a class gets the same images whichever other classes are chosen.
    """
    if k is None or k >= n:
        return list(range(n))
    digest = hashlib.sha256(f"{seed}/{part}/{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


# --------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 from the official files (cifar.py)


def _plan_cifar(files: cifar.CifarFiles, classes, per_class, image_size, seed, where) -> SourcePlan:
    names = files.classes
    chosen = choose_classes(names, classes, where)
    relabel = {names.index(c): i for i, c in enumerate(chosen)}
    picked, labels = {}, {}
    for part in PARTS:
        y = files.labels[part]
        idx = []
        for old in relabel:
            members = np.flatnonzero(y == old)
            idx.extend(members[pick(len(members), per_class[part], seed, part, names[old])].tolist())
        idx.sort()  # keep the files' (class-mixed) order
        picked[part] = idx
        labels[part] = torch.tensor([relabel[int(v)] for v in y[idx]], dtype=torch.int64)

    def decode_part(part, progress):
        x = files.images[part][picked[part]]  # N x 3 x 32 x 32
        if image_size is not None and x.shape[2:] != (image_size, image_size):
            x = np.stack([_resize(img.transpose(1, 2, 0), image_size).transpose(2, 0, 1) for img in x]) \
                if len(x) else x
        return torch.from_numpy(np.ascontiguousarray(x))

    return SourcePlan(chosen, labels["train"], labels["test"], decode_part, {"cifar": files.record()})


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))


def _load_cifar(source: str, root: Path, download: bool, labels: str, where: str) -> cifar.CifarFiles:
    """The official files under ``root``, read offline; downloaded first only when asked and absent."""
    try:
        files = cifar.read(source, root, labels, where)
    except FileNotFoundError:
        if not download:
            raise SipaError(_missing_cifar_message(source, root, "prepare.download is false", where)) from None
        try:
            _download_cifar(source, root)
        except Exception as err:  # noqa: BLE001 - any network or archive failure means "not available"
            raise SipaError(_missing_cifar_message(source, root, f"download failed: {_one_line(err)}",
                                                   where)) from None
        files = cifar.read(source, root, labels, where)
    record = files.record()
    if not record["verdict"].startswith("official"):
        print(f"{where}.root: {files.folder}: {record['verdict']} (recorded in the prepare stage's run "
              f"information)", file=sys.stderr)
    return files


def _download_cifar(source: str, root: Path) -> None:
    """Fetch and extract the official python-version archive (torchvision); raises on any failure
    (tests replace this)."""
    import torchvision.datasets  # noqa: PLC0415 -- slow import, only needed for a download

    cls = getattr(torchvision.datasets, _CIFAR[source][0])
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urllib has no timeout by default: offline would hang
    try:
        cls(str(root), train=True, download=True)
    finally:
        socket.setdefaulttimeout(old)


def _missing_cifar_message(source: str, root: Path, reason: str, where: str) -> str:
    title = _CIFAR[source][1]
    shown = str(root) if root.is_absolute() else f"{root} (= {root.resolve()})"
    return (
        f"{where}.root: {title} files not found under {shown} ({reason}). Put the official files there, "
        f"as extracted from the archive: {cifar.expected_files(source)} "
        f"(https://www.cs.toronto.edu/~kriz/cifar.html; or set prepare.download: true), or use an image "
        f"folder laid out as {_LAYOUT}: dvc exp run -S prepare.source=imagefolder -S prepare.root=/path/to/folder"
    )


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


# --------------------------------------------------------------------------
# Image folders


def image_extensions() -> frozenset[str]:
    """Lower-case file suffixes PIL can open; other files in class folders are ignored."""
    Image.init()
    return frozenset(Image.registered_extensions())


def scan_imagefolder(root: str | os.PathLike,
                     where: str = "prepare") -> tuple[list[str], dict[str, dict[str, list[Path]]]]:
    """Class names (sorted subfolders of train) and ``{part: {class: sorted files}}``.

    Checks the layout; decodes nothing.
    """
    root = Path(root)
    if not root.is_dir():
        raise SipaError(f"{where}.root: folder {root} not found (source imagefolder expects {_LAYOUT})")
    for part in PARTS:  # both parts first: a missing test/ is the likelier mistake than an empty class
        if not (root / part).is_dir():
            raise SipaError(f"{where}.root: {root / part}: folder not found (source imagefolder expects {_LAYOUT})")
    exts = image_extensions()
    files = {}
    for part in PARTS:
        part_dir = root / part
        class_dirs = sorted(p for p in part_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise SipaError(f"{where}.root: {part_dir}: no class subfolders, so no images "
                            f"(expected {part_dir}/<class>/<image>)")
        files[part] = {d.name: _list_images(d, exts, where) for d in class_dirs}
    names = sorted(files["train"])
    if sorted(files["test"]) != names:
        missing = sorted(set(names) - set(files["test"]))
        extra = sorted(set(files["test"]) - set(names))
        parts = (([f"missing {', '.join(missing)}"] if missing else [])
                 + ([f"extra {', '.join(extra)}"] if extra else []))
        raise SipaError(
            f"{where}.root: {root / 'test'}: its class folders differ from those of {root / 'train'} "
            f"({'; '.join(parts)})"
        )
    return names, files


def _list_images(class_dir: Path, exts: frozenset[str], where: str = "prepare") -> list[Path]:
    images = sorted(
        p for p in class_dir.iterdir()
        if p.suffix.lower() in exts and not p.name.startswith(".") and p.is_file()
    )
    if not images:
        raise SipaError(f"{where}.root: {class_dir}: no image files in this class folder")
    return images


def _plan_imagefolder(root, classes, per_class, image_size, seed, where) -> SourcePlan:
    names, files = scan_imagefolder(root, where)
    chosen = choose_classes(names, classes, where)
    paths, labels = {}, {}
    for part in PARTS:
        paths[part], ys = [], []
        for label, name in enumerate(chosen):
            members = files[part][name]
            kept = pick(len(members), per_class[part], seed, part, name)
            paths[part].extend(members[i] for i in kept)
            ys.extend([label] * len(kept))
        labels[part] = torch.tensor(ys, dtype=torch.int64)

    def decode_part(part, progress):
        return decode_images(paths[part], image_size, desc=f"decode {part}", progress=progress)

    return SourcePlan(chosen, labels["train"], labels["test"], decode_part)


def _plan_subset(path, classes, per_class, image_size, seed, where) -> SourcePlan:
    """The embedded subset file (``sipa_core.data.subset``), chosen like an image folder."""
    obj = open_subset(path, where)
    chosen = choose_classes(obj["classes"], classes, where)
    indices, labels = {}, {}
    for part in PARTS:
        all_labels = obj[part]["labels"].tolist()
        indices[part], ys = [], []
        for label, name in enumerate(chosen):
            members = [i for i, y in enumerate(all_labels) if y == obj["classes"].index(name)]
            kept = pick(len(members), per_class[part], seed, part, name)
            indices[part].extend(members[i] for i in kept)
            ys.extend([label] * len(kept))
        labels[part] = torch.tensor(ys, dtype=torch.int64)

    def decode_part(part, progress):
        return decode(obj[part], indices[part], image_size, path)

    return SourcePlan(chosen, labels["train"], labels["test"], decode_part)


def decode_images(
    paths: Sequence[str | os.PathLike],
    image_size: int | None = None,
    *,
    workers: int | None = None,
    desc: str = "decode",
    progress: bool | None = None,
) -> torch.Tensor:
    """Decode image files to uint8 ``N x 3 x H x W`` (RGB), in the given order.

    Without ``image_size`` all images must share the first one's size; with it,
    each is resized to ``image_size x image_size`` (bilinear). A file that
    cannot be read raises a SipaError naming it. ``workers=None`` decodes in
    processes (one per available core) for large inputs: PIL decoding holds the
    GIL for small images, so threads do not help, while two processes nearly
    halve the time on two cores.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("decode_images: no paths")
    if image_size is not None:
        size, resize = (image_size, image_size), True
    else:  # the first image sets the size (PIL order: width, height) all others must have
        height, width = _read_image(paths[0], None, False, paths[0]).shape[:2]
        size, resize = (width, height), False
    out = np.empty((len(paths), size[1], size[0], 3), dtype=np.uint8)
    if workers is None:
        workers = _default_workers(len(paths))
    starts = range(0, len(paths), DECODE_CHUNK)
    chunks = [paths[s:s + DECODE_CHUNK] for s in starts]
    results = _map_chunks(chunks, (size, resize, paths[0]), workers)
    disable = None if progress is None else not progress
    with tqdm(total=len(paths), desc=desc, unit="img", disable=disable, leave=False) as bar:
        for start, block in zip(starts, results):
            out[start:start + len(block)] = block
            bar.update(len(block))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _default_workers(n: int) -> int:
    if n < PARALLEL_MIN_IMAGES or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def _map_chunks(chunks: list[list[str]], args: tuple, workers: int) -> Iterator[np.ndarray]:
    if workers <= 1:
        for chunk in chunks:
            yield _decode_chunk(chunk, *args)
        return
    # fork: children start in milliseconds and need no re-import of torch
    # (about 3 s per process with spawn); they only run PIL and numpy.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        futures = [pool.submit(_decode_chunk, chunk, *args) for chunk in chunks]
        for fut in futures:
            yield fut.result()  # re-raises a worker's SipaError here
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on error: do not decode the rest


def _decode_chunk(paths: list[str], size: tuple[int, int], resize: bool, ref: str) -> np.ndarray:
    return np.stack([_read_image(p, size, resize, ref) for p in paths])


def _read_image(path: str, size: tuple[int, int] | None, resize: bool, ref: str) -> np.ndarray:
    """One image as H x W x 3 uint8; ``size`` is PIL's (width, height)."""
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")  # forces the full decode, so truncated files fail here
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise SipaError(f"{path}: cannot read image ({_one_line(err)})") from None
    if resize:
        img = img.resize(size, Image.Resampling.BILINEAR)
    elif size is not None and img.size != size:
        raise SipaError(
            f"{path}: image is {img.size[0]}x{img.size[1]} but {ref} is {size[0]}x{size[1]}; "
            f"images must share one size, or set prepare.image_size to resize them all"
        )
    return np.asarray(img)
