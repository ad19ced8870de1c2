"""Tests for sipa_core.data (sources and the prepare stage)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sipa_core.data import sources
from sipa_core.data.prepare import prepare, split_train_val, stratified_counts
from sipa_core.data.prepared import load_prepared
from sipa_core.data.sources import plan_source
from sipa_core.errors import SipaError
from test_cifar import images_and_labels, write_cifar100_binary

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "stages" / "prepare.py"


def make_folder(root: Path, train: dict[str, int], test: dict[str, int], size=(8, 6), seed=0) -> Path:
    """An image folder of random PNGs: ``{class: count}`` per part; size is (w, h)."""
    rng = np.random.default_rng(seed)
    for part, counts in (("train", train), ("test", test)):
        for name, n in counts.items():
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def cfg_for(tmp_path: Path, root: Path, **overrides) -> dict:
    cfg = {
        "source": "imagefolder",
        "root": str(root),
        "val_size": 0,
        "out": str(tmp_path / "out" / "dataset.pt"),
        "metrics": str(tmp_path / "out" / "prepare.json"), "info": str(tmp_path / "out" / "info.json"),
    }
    cfg.update(overrides)
    return cfg


def run_prepare(tmp_path: Path, root: Path, **overrides):
    cfg = cfg_for(tmp_path, root, **overrides)
    metrics = prepare(cfg, progress=False)
    return load_prepared(cfg["out"]), metrics, cfg


@pytest.fixture
def folder(tmp_path):
    """Three balanced classes: 20 training and 5 test images each, 8x6 pixels."""
    return make_folder(tmp_path / "imgs", {c: 20 for c in ("ant", "bee", "cat")}, {c: 5 for c in ("ant", "bee", "cat")})


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any image gets decoded (for checks that must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded before the parameters were checked")
    monkeypatch.setattr(sources, "decode_images", refuse)
    monkeypatch.setattr(sources, "_read_image", refuse)


# --------------------------------------------------------------------------
# Splits


def test_split_sizes_stratification_and_file_contents(tmp_path, folder):
    data, metrics, cfg = run_prepare(tmp_path, folder, val_size=6)
    assert data.classes == ["ant", "bee", "cat"]
    assert data.train_x.shape == (54, 3, 6, 8) and data.val_x.shape == (6, 3, 6, 8)
    assert data.test_x.shape == (15, 3, 6, 8)
    assert data.image_size == (6, 8) and data.num_classes == 3
    assert torch.bincount(data.val_y).tolist() == [2, 2, 2]
    assert torch.bincount(data.train_y).tolist() == [18, 18, 18]
    assert torch.bincount(data.test_y).tolist() == [5, 5, 5]
    for split in ("train", "val", "test"):
        x, y = data.split(split)
        assert x.dtype == torch.uint8 and x.is_contiguous() and y.dtype == torch.int64
    # No image is in both train and val: all 60 training files appear exactly once.
    flat = torch.cat([data.train_x, data.val_x]).reshape(60, -1)
    assert len({bytes(row.numpy()) for row in flat}) == 60
    # Pixels are the PNG's pixels, channels first.
    first = np.array(Image.open(folder / "test" / "ant" / "000.png"))
    assert torch.equal(data.test_x[0], torch.from_numpy(first).permute(2, 0, 1))
    written = {**json.loads(Path(cfg["metrics"]).read_text()), **json.loads(Path(cfg["info"]).read_text())}
    assert metrics == written  # numbers in the metrics file, the rest (mean, std, versions) in the info file
    assert "mean" in json.loads(Path(cfg["info"]).read_text())
    assert (metrics["train_images"], metrics["val_images"], metrics["test_images"]) == (54, 6, 15)
    assert (metrics["num_classes"], metrics["image_height"], metrics["image_width"]) == (3, 6, 8)
    assert data.source["source"] == "imagefolder" and data.source["val_size"] == 6


def test_stratified_counts_are_proportional_and_keep_a_training_image():
    assert stratified_counts([20, 20, 20], 6) == [2, 2, 2]
    assert stratified_counts([10, 20, 30], 12) == [2, 4, 6]
    assert stratified_counts([5, 5, 5], 4) == [2, 1, 1]  # remainder to the lowest class index
    assert stratified_counts([1, 1, 1, 1, 96], 95) == [0, 0, 0, 0, 95]
    assert stratified_counts([3, 3], 0) == [0, 0]


def test_uneven_classes_split_proportionally(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 10, "b": 20, "c": 30}, {"a": 1, "b": 1, "c": 1})
    data, _, _ = run_prepare(tmp_path, root, val_size=12)
    assert torch.bincount(data.val_y).tolist() == [2, 4, 6]


def test_same_seed_same_bytes_other_seed_other_split(tmp_path, folder):
    a, _, cfg_a = run_prepare(tmp_path / "a", folder, val_size=6, images_per_class=10, seed=3)
    b, _, cfg_b = run_prepare(tmp_path / "b", folder, val_size=6, images_per_class=10, seed=3)
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert Path(cfg_a["out"]).read_bytes() == Path(cfg_b["out"]).read_bytes()
    c, _, _ = run_prepare(tmp_path / "c", folder, val_size=6, images_per_class=10, seed=4)
    assert not torch.equal(a.val_x, c.val_x)
    assert not torch.equal(a.train_x, c.train_x)


def test_split_train_val_indices_are_disjoint_and_cover_the_pool():
    labels = torch.tensor([0, 1, 2] * 10)
    train, val = split_train_val(labels, 3, 9, seed=0)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(30))
    assert torch.bincount(labels[val]).tolist() == [3, 3, 3]
    assert train.tolist() == sorted(train.tolist()) and val.tolist() == sorted(val.tolist())


def test_mean_std_equal_direct_computation_over_train(tmp_path, folder):
    data, metrics, _ = run_prepare(tmp_path, folder, val_size=9)
    pixels = data.train_x.double() / 255
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False)
    assert torch.allclose(torch.tensor(data.mean, dtype=torch.float64), mean, rtol=0, atol=1e-12)
    assert torch.allclose(torch.tensor(data.std, dtype=torch.float64), std, rtol=0, atol=1e-12)
    # Computed from train only: the full pool gives different numbers.
    pool = torch.cat([data.train_x, data.val_x]).double() / 255
    assert not torch.allclose(pool.mean(dim=(0, 2, 3)), mean, rtol=0, atol=1e-12)
    assert list(metrics["mean"].values()) != [] and metrics["mean"]["r"] == data.mean[0]


def test_val_size_zero_keeps_every_training_image(tmp_path, folder):
    data, metrics, _ = run_prepare(tmp_path, folder, val_size=0)
    assert data.train_x.shape[0] == 60 and data.val_x.shape == (0, 3, 6, 8)
    assert data.val_y.shape == (0,) and metrics["val_images"] == 0


def test_val_size_too_large_fails_before_decoding(tmp_path, folder, no_decoding):
    with pytest.raises(SipaError, match=r"params\.yaml: prepare\.val_size: 58 is too large.*at most 57"):
        prepare(cfg_for(tmp_path, folder, val_size=58), progress=False)


# --------------------------------------------------------------------------
# Subset controls


def test_classes_subset_keeps_source_order(tmp_path, folder):
    data, _, _ = run_prepare(tmp_path, folder, classes=["cat", "ant"], val_size=2)
    assert data.classes == ["ant", "cat"]
    assert torch.bincount(data.train_y).tolist() == [19, 19]
    assert torch.bincount(data.test_y).tolist() == [5, 5]


def test_images_per_class_is_seeded_not_first_files(tmp_path, folder):
    data, _, _ = run_prepare(tmp_path, folder, images_per_class=7, test_images_per_class=3)
    assert torch.bincount(data.train_y).tolist() == [7, 7, 7]
    assert torch.bincount(data.test_y).tolist() == [3, 3, 3]
    first_seven = torch.stack([
        torch.from_numpy(np.array(Image.open(folder / "train" / "ant" / f"{i:03d}.png"))).permute(2, 0, 1)
        for i in range(7)
    ])
    assert not torch.equal(data.train_x[:7], first_seven)
    assert sources.pick(20, 7, 0, "train", "ant") != list(range(7))
    assert sources.pick(20, 7, 0, "train", "ant") == sources.pick(20, 7, 0, "train", "ant")
    assert sources.pick(5, 9, 0, "train", "ant") == [0, 1, 2, 3, 4]


def test_a_class_gets_the_same_images_whatever_else_is_chosen(tmp_path, folder):
    everything = plan_source("imagefolder", folder, images_per_class=5).decode(progress=False)
    bee_only = plan_source("imagefolder", folder, images_per_class=5, classes=["bee"]).decode(progress=False)
    assert torch.equal(bee_only.train_x, everything.train_x[everything.train_y == 1])


def test_unknown_class_suggests_the_right_name(tmp_path, folder, no_decoding):
    with pytest.raises(SipaError, match=r"prepare\.classes: unknown class 'bea' \(did you mean 'bee'\?\)"):
        prepare(cfg_for(tmp_path, folder, classes=["ant", "bea"]), progress=False)


def test_class_listed_twice_is_an_error(tmp_path, folder, no_decoding):
    with pytest.raises(SipaError, match="listed twice"):
        prepare(cfg_for(tmp_path, folder, classes=["ant", "ant"]), progress=False)


def test_image_size_resizes_mixed_sizes(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 2, "b": 2}, {"a": 1, "b": 1}, size=(8, 6))
    make_folder(tmp_path / "more", {"a": 1}, {}, size=(12, 10))
    (tmp_path / "more" / "train" / "a" / "000.png").rename(root / "train" / "a" / "zzz.png")
    with pytest.raises(SipaError, match=r"zzz\.png: image is 12x10 but .*000\.png is 8x6.*prepare\.image_size"):
        run_prepare(tmp_path, root)
    data, _, _ = run_prepare(tmp_path, root, image_size=16)
    assert data.train_x.shape == (5, 3, 16, 16) and data.test_x.shape == (2, 3, 16, 16)


# --------------------------------------------------------------------------
# Bad folders and files


def test_test_classes_must_match_train(tmp_path):
    root = make_folder(tmp_path / "imgs", {"ant": 2, "bee": 2}, {"ant": 1, "wasp": 1})
    with pytest.raises(SipaError, match=r"imgs/test: its class folders differ .*missing bee; extra wasp"):
        plan_source("imagefolder", root)


def test_corrupt_image_is_named(tmp_path, folder):
    bad = folder / "train" / "bee" / "007.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(SipaError) as err:
        run_prepare(tmp_path, folder)
    assert str(bad) in str(err.value) and "cannot read image" in str(err.value)
    assert not (tmp_path / "out" / "dataset.pt").exists()


def test_truncated_image_is_named(tmp_path, folder):
    bad = folder / "test" / "cat" / "001.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(SipaError, match=rf"{bad}: cannot read image"):
        run_prepare(tmp_path, folder)


def test_empty_and_missing_folders_are_named(tmp_path, folder):
    empty = folder / "train" / "dog"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(SipaError, match=rf"{empty}: no image files"):
        plan_source("imagefolder", folder)
    with pytest.raises(SipaError, match=r"prepare\.root: folder .*nowhere not found"):
        plan_source("imagefolder", tmp_path / "nowhere")
    (tmp_path / "bare" / "train").mkdir(parents=True)
    (tmp_path / "bare" / "test").mkdir()
    with pytest.raises(SipaError, match=r"bare/train: no class subfolders"):
        plan_source("imagefolder", tmp_path / "bare")
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(SipaError, match=r"half/test: folder not found"):
        plan_source("imagefolder", tmp_path / "half")


def test_parameter_types_are_checked_in_library(tmp_path, folder, no_decoding):
    with pytest.raises(SipaError, match=r"my\.yaml: prepare\.images_per_class: must be >= 1"):
        prepare(cfg_for(tmp_path, folder, images_per_class=0), params_file="my.yaml")
    with pytest.raises(SipaError, match=r"prepare\.classes: must list at least one"):
        prepare(cfg_for(tmp_path, folder, classes=[]))
    with pytest.raises(SipaError, match=r"prepare\.image_size: must be >= 8"):
        prepare(cfg_for(tmp_path, folder, image_size=4))


# --------------------------------------------------------------------------
# The stage script, run as DVC runs it


def _run_stage(cwd: Path, params: str) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(params)
    return subprocess.run([sys.executable, str(STAGE), "--params", "params.yaml"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a stage subprocess per case
@pytest.mark.parametrize("line, key", [
    ("  val_size: many\n", "prepare.val_size"),
    ("  classes: cat\n", "prepare.classes"),
])
def test_stage_rejects_wrong_types_with_exit_2(tmp_path, line, key):
    proc = _run_stage(tmp_path, "prepare:\n  source: imagefolder\n" + line)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "params.yaml" in lines[0] and key in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a stage subprocess
def test_stage_runs_from_another_cwd_with_relative_paths(tmp_path):
    make_folder(tmp_path / "imgs", {"a": 4, "b": 4}, {"a": 2, "b": 2})
    proc = _run_stage(tmp_path, "prepare:\n  source: imagefolder\n  root: imgs\n  val_size: 2\n")
    assert proc.returncode == 0, proc.stderr
    assert "6 train / 2 val / 4 test" in proc.stdout
    data = load_prepared(tmp_path / "data" / "prepared" / "dataset.pt")
    assert data.classes == ["a", "b"]
    assert json.loads((tmp_path / "metrics" / "prepare.json").read_text())["val_images"] == 2


# --------------------------------------------------------------------------
# CIFAR sources


def test_cifar100_offline_and_absent_explains_how_to_switch(tmp_path, monkeypatch):
    calls = []

    def offline(source, root):
        calls.append(source)
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(sources, "_download_cifar", offline)
    start = time.monotonic()
    with pytest.raises(SipaError) as err:
        prepare(cfg_for(tmp_path, tmp_path / "raw", source="cifar100", download=True))
    assert time.monotonic() - start < 30  # the torchvision import, no network wait
    message = str(err.value)
    assert calls == ["cifar100"]
    assert "\n" not in message and "Traceback" not in message
    assert "prepare.source=imagefolder" in message and "cifar-100-python" in message
    assert str(tmp_path / "raw") in message and "Network is unreachable" in message

    monkeypatch.setattr(sources, "_download_cifar", lambda *a: pytest.fail("download attempted"))
    with pytest.raises(SipaError, match="prepare.download is false"):
        plan_source("cifar10", tmp_path / "raw", download=False)


def test_cifar_subset_controls_apply_to_the_official_files(tmp_path):
    """Classes, images per class and resizing choose from the files read (here 60 training and 30
    test records in the official binary format, six classes)."""
    train, test = images_and_labels(60, 6, 0), images_and_labels(30, 6, 1)
    write_cifar100_binary(tmp_path / "raw", train, test)
    plan = plan_source("cifar100", tmp_path / "raw", classes=["fine5", "fine0"], images_per_class=4,
                       test_images_per_class=2)
    raw = plan.decode()
    assert raw.classes == ["fine0", "fine5"]  # the files' order, whatever the list's
    assert raw.train_x.shape == (8, 3, 32, 32) and raw.test_x.shape == (4, 3, 32, 32)
    assert torch.bincount(raw.train_y).tolist() == [4, 4]
    # Each chosen image is a file's image of the right class, channels first.
    archive, labels = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    for x, y in zip(raw.train_x, raw.train_y):
        match = (archive == x).flatten(1).all(1).nonzero().flatten()
        assert len(match) == 1 and labels[match[0]] == (0 if y == 0 else 5)
    resized = plan_source("cifar100", tmp_path / "raw", image_size=16).decode()
    assert resized.train_x.shape == (60, 3, 16, 16)
    assert plan.record["cifar"]["version"] == "binary"


# --------------------------------------------------------------------------
# Files


def test_failed_write_leaves_existing_output_unchanged(tmp_path, folder, monkeypatch):
    _, _, cfg = run_prepare(tmp_path, folder)
    before = Path(cfg["out"]).read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(SipaError, match="could not write \\(disk full\\)"):
        run_prepare(tmp_path, folder, val_size=6)
    assert Path(cfg["out"]).read_bytes() == before
    assert sorted(p.name for p in Path(cfg["out"]).parent.iterdir()) == ["dataset.pt", "info.json", "prepare.json"]


def test_load_prepared_refuses_other_files(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(SipaError, match=rf"{other}: not a sipa-prepared data file"):
        load_prepared(other)
    partial = tmp_path / "partial.pt"
    torch.save({"format": "sipa-prepared", "version": 1, "train_x": torch.zeros(1, 3, 2, 2, dtype=torch.uint8)},
               partial)
    with pytest.raises(SipaError, match=rf"{partial}: sipa-prepared file lacks train_y"):
        load_prepared(partial)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(SipaError, match=rf"{garbage}: cannot read prepared data"):
        load_prepared(garbage)
    with pytest.raises(SipaError, match="not found"):
        load_prepared(tmp_path / "missing.pt")


# --------------------------------------------------------------------------
# The real data set (skipped when $SIPA_CIFAR10_JPEG is absent)


def test_real_cifar10_jpeg_subset(tmp_path, cifar10_jpeg):
    data, metrics, cfg = run_prepare(tmp_path, cifar10_jpeg, images_per_class=100,
                                     test_images_per_class=50, val_size=100)
    assert data.train_x.shape == (900, 3, 32, 32)
    assert data.val_x.shape == (100, 3, 32, 32)
    assert data.test_x.shape == (500, 3, 32, 32)
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(data.val_y).tolist() == [10] * 10
    assert np.allclose(data.mean, [0.4913, 0.4821, 0.4465], atol=0.02)
    assert all(0.2 < s < 0.3 for s in data.std)
    again = load_prepared(cfg["out"])
    assert torch.equal(again.train_x, data.train_x) and again.mean == data.mean
    assert metrics["train_images"] == 900 and metrics["num_classes"] == 10
