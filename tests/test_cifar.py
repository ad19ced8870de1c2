"""CIFAR-10 and CIFAR-100 read offline from the official files: the binary version and the
python version (any pickle protocol) written here in the official formats, so the reader is
tested without the real files; the real CIFAR-100 binary files (``$SIPA_CIFAR100_BINARY``) where
they are at hand."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sipa_core.data import cifar
from sipa_core.data.prepare import prepare
from sipa_core.data.prepared import load_prepared
from sipa_core.errors import SipaError

ROOT = Path(__file__).resolve().parents[1]
FINE = [f"fine{i}" for i in range(6)]
COARSE = ["coarse0", "coarse1"]


def images_and_labels(n: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    fine = np.arange(n) % classes
    return x, fine, fine % 2  # coarse: two superclasses


def write_cifar100_binary(folder: Path, train, test) -> Path:
    """Records as the official binary version: coarse label, fine label, R, G, B planes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, fine, coarse) in (("train.bin", train), ("test.bin", test)):
        records = np.concatenate([coarse[:, None].astype(np.uint8), fine[:, None].astype(np.uint8),
                                  x.reshape(len(x), -1)], axis=1)
        records.tofile(folder / name)
    (folder / "fine_label_names.txt").write_text("\n".join(FINE) + "\n")
    (folder / "coarse_label_names.txt").write_text("\n".join(COARSE) + "\n")
    return folder


def write_cifar100_python(folder: Path, train, test, protocol: int) -> Path:
    """Pickled dictionaries as the official python version (torchvision's layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, fine, coarse) in (("train", train), ("test", test)):
        batch = {b"filenames": [b"img.png"] * len(x), b"batch_label": name.encode(),
                 b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist(), b"data": x.reshape(len(x), -1)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"fine_label_names": [n.encode() for n in FINE], b"coarse_label_names": [n.encode() for n in COARSE]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder


def write_cifar10_binary(folder: Path, train, test) -> Path:
    """Five training batches and a test batch of label byte + pixels, and the label names."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(train[0])), 5)
    for k, idx in enumerate(parts, start=1):
        records = np.concatenate([train[1][idx, None].astype(np.uint8), train[0][idx].reshape(len(idx), -1)], 1)
        records.tofile(folder / f"data_batch_{k}.bin")
    np.concatenate([test[1][:, None].astype(np.uint8), test[0].reshape(len(test[0]), -1)], 1).tofile(
        folder / "test_batch.bin")
    (folder / "batches.meta.txt").write_text("\n".join(FINE) + "\n\n")
    return folder


def cfg(tmp_path: Path, root: Path, **overrides) -> dict:
    return {"source": "cifar100", "root": str(root), "val_size": 0, "images_per_class": None,
            "test_images_per_class": None, "download": False, "out": str(tmp_path / "out/data.pt"),
            "metrics": str(tmp_path / "out/prepare.json"), "info": str(tmp_path / "out/info.json"), **overrides}


def prepared(tmp_path: Path, root: Path, name: str, **overrides):
    c = cfg(tmp_path / name, root, **overrides)
    prepare(c, progress=False)
    return load_prepared(c["out"]), json.loads(Path(c["info"]).read_text())


@pytest.fixture
def small():
    return images_and_labels(48, 6, 0), images_and_labels(12, 6, 1)


def test_the_binary_and_every_python_version_give_the_same_data(tmp_path, small):
    train, test = small
    binary = write_cifar100_binary(tmp_path / "raw/cifar-100-binary", train, test)
    data, info = prepared(tmp_path, tmp_path / "raw", "binary")  # found in the folder the archive extracts to
    assert data.classes == FINE and data.train_x.shape == (48, 3, 32, 32) and data.test_x.shape == (12, 3, 32, 32)
    assert torch.equal(data.train_x, torch.from_numpy(train[0])) and data.train_y.tolist() == train[1].tolist()
    assert info["cifar"]["version"] == "binary" and info["cifar"]["folder"] == str(binary)
    assert info["cifar"]["files"]["train.bin"]["official"] is False  # a few records: not the official bytes
    assert info["cifar"]["verdict"].startswith("not the official bytes: train.bin, test.bin differ")
    for protocol in (0, 2, 4, 5):  # any protocol: the official files are protocol 2, re-pickled ones vary
        write_cifar100_python(tmp_path / f"py{protocol}/cifar-100-python", train, test, protocol)
        other, info = prepared(tmp_path, tmp_path / f"py{protocol}", f"python{protocol}")
        assert info["cifar"]["version"] == "python" and info["cifar"]["algorithm"] == "md5"
        for split in ("train", "test"):
            assert torch.equal(other.split(split)[0], data.split(split)[0])
            assert torch.equal(other.split(split)[1], data.split(split)[1])
    coarse, _ = prepared(tmp_path, binary, "coarse", labels="coarse")  # root may be the folder itself
    assert coarse.classes == COARSE and coarse.train_y.tolist() == train[2].tolist()


def test_cifar10_binary_goes_through_the_same_reader(tmp_path):
    train, test = images_and_labels(50, 6, 2), images_and_labels(10, 6, 3)
    write_cifar10_binary(tmp_path / "raw/cifar-10-batches-bin", train, test)
    data, info = prepared(tmp_path, tmp_path / "raw", "c10", source="cifar10")
    assert data.classes == FINE and torch.equal(data.train_x, torch.from_numpy(train[0]))
    assert data.test_y.tolist() == test[1].tolist() and info["cifar"]["algorithm"] == "sha1"
    with pytest.raises(SipaError, match="cifar10 has fine labels, not 'coarse'"):
        prepared(tmp_path, tmp_path / "raw", "c10c", source="cifar10", labels="coarse")


@pytest.mark.parametrize("damage, message", [
    ("truncate", "test.bin: 36,885 bytes is not a whole number of 3,074-byte records"),
    ("missing", "test.bin: file not found (the binary version of CIFAR100 has train.bin, test.bin"),
    ("pickle", "train: not a CIFAR python-version file (global posix.system refused"),
    ("absent", "CIFAR-100 files not found under"),
])
def test_a_damaged_or_missing_file_is_one_line_naming_it_and_exit_2(tmp_path, small, damage, message, run_script):
    train, test = small
    folder = write_cifar100_binary(tmp_path / "raw", train, test)
    if damage == "truncate":
        (folder / "test.bin").write_bytes((folder / "test.bin").read_bytes()[:-3])
    elif damage == "missing":
        (folder / "test.bin").unlink()
    elif damage == "pickle":  # a python version whose pickle would run code
        for f in folder.iterdir():
            f.unlink()
        write_cifar100_python(folder, train, test, 2)

        class Evil:
            def __reduce__(self):
                import os  # noqa: PLC0415 (the payload a pickle can carry)
                return os.system, ("echo pickled code ran",)

        (folder / "train").write_bytes(pickle.dumps(Evil(), protocol=2))
    elif damage == "absent":
        for f in folder.iterdir():
            f.unlink()
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"prepare": cfg(tmp_path, folder)}))
    code, out, err = run_script(ROOT / "stages/prepare.py", "--params", params, cwd=tmp_path)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "prepare.root" in lines[0], err
    assert "pickled code ran" not in out + err and not (tmp_path / "out").exists()
    if damage == "absent":  # where to put which files, both versions, and how to download
        assert "cifar-100-binary/ (train.bin" in lines[0] and "cifar-100-python/ (train, test, meta)" in lines[0]
        assert "prepare.download is false" in lines[0]


def test_the_official_digests_are_recognised(tmp_path, small, monkeypatch):
    """A file whose digest is the published one is 'official' (the published list patched here to
    the test file's own digest, which is how the real files are recognised)."""
    train, test = small
    folder = write_cifar100_binary(tmp_path / "raw", train, test)
    dist = cifar.DISTRIBUTIONS[("cifar100", "binary")]
    own = {name: cifar._digest(folder / name, "sha1") for name in ("train.bin", "test.bin")}
    patched = cifar.Distribution(dist.dataset, dist.version, dist.folder, dist.algorithm,
                                 (("train.bin", own["train.bin"]),), (("test.bin", own["test.bin"]),), dist.names)
    monkeypatch.setitem(cifar.DISTRIBUTIONS, ("cifar100", "binary"), patched)
    _, info = prepared(tmp_path, folder, "official")
    assert info["cifar"]["verdict"] == "official files (every published digest matches)"


# --------------------------------------------------------------------------
# The real CIFAR-100 (skipped when $SIPA_CIFAR100_BINARY is absent)

@pytest.mark.slow  # 184 MB read, hashed and prepared twice (binary and python versions)
def test_the_real_cifar100_binary_offline_and_its_python_version(tmp_path, cifar100_binary):
    data, info = prepared(tmp_path, cifar100_binary, "real", download=False)
    assert (len(data.train_y), len(data.test_y), data.num_classes) == (50_000, 10_000, 100)
    assert torch.bincount(data.train_y).tolist() == [500] * 100 and torch.bincount(data.test_y).tolist() == [100] * 100
    assert data.train_y[:5].tolist() == [19, 29, 0, 11, 1] and data.test_y[:5].tolist() == [49, 33, 72, 51, 71]
    assert data.classes[:3] == ["apple", "aquarium_fish", "baby"]
    assert [round(m, 4) for m in data.mean] == [0.5071, 0.4865, 0.4409]
    assert info["cifar"]["verdict"] == "official files (every published digest matches)"
    assert info["cifar"]["files"]["train.bin"]["digest"] == "e207cd2e05b73b1393c74c7f5e7bea451d63e08e"
    # The same images through the python version (written here from the binary files, protocol 2 as
    # the official archive's pickles are); its digests differ from the official pickles', and say so.
    files = cifar.read("cifar100", cifar100_binary, "fine", "prepare")
    coarse = cifar.read("cifar100", cifar100_binary, "coarse", "prepare")
    parts = {p: (files.images[p], files.labels[p], coarse.labels[p]) for p in ("train", "test")}
    folder = write_cifar100_python(tmp_path / "py/cifar-100-python", parts["train"], parts["test"], 2)
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [c.encode() for c in files.classes],
                                                b"coarse_label_names": [c.encode() for c in coarse.classes]}, 2))
    again, info = prepared(tmp_path, tmp_path / "py", "python", download=False)
    assert all(torch.equal(a, b) for a, b in zip(again.split("train") + again.split("test"),
                                                 data.split("train") + data.split("test")))
    assert again.classes == data.classes and info["cifar"]["verdict"].startswith("not the official bytes")
