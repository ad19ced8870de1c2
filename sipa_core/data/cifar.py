"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) read offline from the files a user has.

Both official distributions are read, from ``prepare.root`` itself or from the
folder the official archive extracts to under it:

* the **binary version** (``cifar-100-binary/``: ``train.bin``, ``test.bin``,
  ``fine_label_names.txt``, ``coarse_label_names.txt``; ``cifar-10-batches-bin/``:
  ``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test_batch.bin``,
  ``batches.meta.txt``): fixed-size records, the label byte(s) (CIFAR-100: coarse,
  then fine) then 3,072 pixel bytes, the red, green and blue planes of 32 x 32 in
  row-major order;
* the **python version** (``cifar-100-python/``: ``train``, ``test``, ``meta``;
  ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
  ``batches.meta``): pickled dictionaries, whatever the pickle protocol, read by an
  unpickler that builds nothing but containers, strings, numbers and numpy arrays
  (a pickle naming any other global is refused: it could run code).

Each file's digest is compared with the published one: SHA1 for the binary files
(as MXNet Gluon's dataset loaders publish them, ``gluon/data/vision/datasets.py``),
MD5 for the python files (torchvision's ``datasets/cifar.py``). A mismatch is said
and recorded in ``info/prepare.json`` (re-pickled or re-packed files can hold the
same images), never silent; a missing file, or one that is not a whole number of
records, is one line naming it.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sipa_core.errors import SipaError

PIXELS = 3 * 32 * 32
LABEL_KINDS = ("fine", "coarse")


@dataclass(frozen=True)
class Distribution:
    """One official distribution of one data set: its folder, its files with their published
    digests, and how its records and label names are read."""

    dataset: str  # cifar10 | cifar100
    version: str  # binary | python
    folder: str  # what the official archive extracts to
    algorithm: str  # the published digests' algorithm
    train: tuple[tuple[str, str], ...]  # (file, digest)
    test: tuple[tuple[str, str], ...]
    names: tuple[tuple[str, str], ...]  # label kind -> file of names (binary) or meta key (python)
    meta: tuple[str, str] | None = None  # python: (meta file, digest)

    def files(self) -> list[tuple[str, str | None]]:
        out = list(self.train) + list(self.test)
        if self.meta is not None:
            out.append(self.meta)
        if self.version == "binary":
            out += [(name, None) for _, name in self.names]
        return out


DISTRIBUTIONS = {
    ("cifar100", "binary"): Distribution(
        "cifar100", "binary", "cifar-100-binary", "sha1",
        (("train.bin", "e207cd2e05b73b1393c74c7f5e7bea451d63e08e"),),
        (("test.bin", "8fb6623e830365ff53cf14adec797474f5478006"),),
        (("fine", "fine_label_names.txt"), ("coarse", "coarse_label_names.txt"))),
    ("cifar10", "binary"): Distribution(
        "cifar10", "binary", "cifar-10-batches-bin", "sha1",
        (("data_batch_1.bin", "aadd24acce27caa71bf4b10992e9e7b2d74c2540"),
         ("data_batch_2.bin", "c0ba65cce70568cd57b4e03e9ac8d2a5367c1795"),
         ("data_batch_3.bin", "1dd00a74ab1d17a6e7d73e185b69dbf31242f295"),
         ("data_batch_4.bin", "aab85764eb3584312d3c7f65fd2fd016e36a258e"),
         ("data_batch_5.bin", "26e2849e66a845b7f1e4614ae70f4889ae604628")),
        (("test_batch.bin", "67eb016db431130d61cd03c7ad570b013799c88c"),),
        (("fine", "batches.meta.txt"),)),
    ("cifar100", "python"): Distribution(
        "cifar100", "python", "cifar-100-python", "md5",
        (("train", "16019d7e3df5f24257cddd939b257f8d"),), (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        (("fine", "fine_label_names"), ("coarse", "coarse_label_names")),
        ("meta", "7973b15100ade9c7d40fb424638fde48")),
    ("cifar10", "python"): Distribution(
        "cifar10", "python", "cifar-10-batches-py", "md5",
        (("data_batch_1", "c99cafc152244af753f735de768cd75f"), ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
         ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"), ("data_batch_4", "634d18415352ddfa80567beed471001a"),
         ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        (("test_batch", "40351d587109b95175f43aff81a1287e"),), (("fine", "label_names"),),
        ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")),
}


@dataclass
class CifarFiles:
    """What was read: images (uint8 N x 3 x 32 x 32) and labels per part, the class names, and
    where they came from with each file's digest against the published one."""

    images: dict  # part -> np.ndarray
    labels: dict  # part -> np.ndarray (int64)
    classes: list[str]
    distribution: Distribution
    folder: Path
    digests: dict  # file -> {"digest", "official" (bool, or None where none is published)}

    def record(self) -> dict:
        """The run-information record: the files read, their digests, the verdict."""
        differ = [f for f, d in self.digests.items() if d["official"] is False]
        verdict = ("official files (every published digest matches)" if not differ else
                   f"not the official bytes: {', '.join(differ)} differ from the published "
                   f"{self.distribution.algorithm.upper()}")
        return {"version": self.distribution.version, "folder": str(self.folder),
                "algorithm": self.distribution.algorithm, "files": self.digests, "verdict": verdict}


def find(dataset: str, root: Path) -> tuple[Distribution, Path] | None:
    """The distribution present in ``root`` or in its official folder under it (binary first)."""
    for version in ("binary", "python"):
        dist = DISTRIBUTIONS[(dataset, version)]
        for folder in (root / dist.folder, root):
            if any((folder / name).is_file() for name, _ in dist.train):
                return dist, folder
    return None


def expected_files(dataset: str) -> str:
    """What a user should put where, for the message when nothing is found."""
    out = []
    for version in ("binary", "python"):
        dist = DISTRIBUTIONS[(dataset, version)]
        out.append(f"{dist.folder}/ ({', '.join(name for name, _ in dist.files())})")
    return " or ".join(out)


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_files(dist: Distribution, folder: Path, where: str) -> dict:
    digests = {}
    for name, published in dist.files():
        path = folder / name
        if not path.is_file():
            raise SipaError(f"{where}.root: {path}: file not found (the {dist.version} version of "
                            f"{dist.dataset.upper()} has {', '.join(n for n, _ in dist.files())})")
        if published is not None:
            digest = _digest(path, dist.algorithm)
            digests[name] = {"digest": digest, "official": digest == published}
    return digests


def _read_records(path: Path, label_bytes: int, where: str) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.uint8)
    size = label_bytes + PIXELS
    if raw.size == 0 or raw.size % size:
        raise SipaError(f"{where}.root: {path}: {raw.size:,} bytes is not a whole number of {size:,}-byte records "
                        f"(truncated or not a CIFAR binary file)")
    return raw.reshape(-1, size)


def _names_file(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_binary(dist: Distribution, folder: Path, labels: str, where: str) -> tuple[dict, dict, list[str]]:
    label_bytes = 2 if dist.dataset == "cifar100" else 1
    column = {"coarse": 0, "fine": 1}[labels] if dist.dataset == "cifar100" else 0
    images, targets = {}, {}
    for part, files in (("train", dist.train), ("test", dist.test)):
        records = np.concatenate([_read_records(folder / name, label_bytes, where) for name, _ in files])
        images[part] = records[:, label_bytes:].reshape(-1, 3, 32, 32)
        targets[part] = records[:, column].astype(np.int64)
    return images, targets, _names_file(folder / dict(dist.names)[labels])


class _ArraysOnly(pickle.Unpickler):
    """Builds containers, strings, numbers and numpy arrays only: any other global is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} refused: a CIFAR pickle holds arrays only")
        return super().find_class(module, name)


def _unpickle(path: Path, where: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise SipaError(f"{where}.root: {path}: not a CIFAR python-version file "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not isinstance(obj, dict):
        raise SipaError(f"{where}.root: {path}: not a CIFAR python-version file (no dictionary inside)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _python_part(path: Path, key: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path, where)
    data, labels = batch.get("data"), batch.get(key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS \
            or labels is None or len(labels) != len(data):
        raise SipaError(f"{where}.root: {path}: not a CIFAR python-version file (expected 'data', N x {PIXELS} "
                        f"uint8, and '{key}', one label per image)")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _read_python(dist: Distribution, folder: Path, labels: str, where: str) -> tuple[dict, dict, list[str]]:
    key = {"cifar100": f"{labels}_labels", "cifar10": "labels"}[dist.dataset]
    images, targets = {}, {}
    for part, files in (("train", dist.train), ("test", dist.test)):
        parts = [_python_part(folder / name, key, where) for name, _ in files]
        images[part] = np.concatenate([x for x, _ in parts])
        targets[part] = np.concatenate([y for _, y in parts])
    names = _unpickle(folder / dist.meta[0], where).get(dict(dist.names)[labels])
    if not isinstance(names, list):
        raise SipaError(f"{where}.root: {folder / dist.meta[0]}: no {dict(dist.names)[labels]} list")
    return images, targets, [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def read(dataset: str, root: Path, labels: str, where: str) -> CifarFiles:
    """Both parts of the distribution found under ``root`` (None: nothing there; the caller says so)."""
    found = find(dataset, root)
    if found is None:
        raise FileNotFoundError(root)
    dist, folder = found
    if labels not in dict(dist.names):
        raise SipaError(f"{where}.labels: {dataset} has {' and '.join(dict(dist.names))} labels, not {labels!r}")
    digests = _check_files(dist, folder, where)
    reader = _read_binary if dist.version == "binary" else _read_python
    images, targets, classes = reader(dist, folder, labels, where)
    for part in ("train", "test"):
        if len(targets[part]) and int(targets[part].max()) >= len(classes):
            raise SipaError(f"{where}.root: {folder}: a {part} label ({int(targets[part].max())}) has no name in "
                            f"its {len(classes)} class names")
    return CifarFiles(images, targets, classes, dist, folder, digests)
