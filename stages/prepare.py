"""DVC stage ``prepare``: build the train/val/test file from the ``prepare`` params.

    python stages/prepare.py [--params params.yaml]

All logic lives in ``sipa_core.data``; a SipaError prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import sipa_core  # noqa: F401 - installed with pip install -e .
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipa_core.data import PREPARE_SCHEMA, prepare
from sipa_core.errors import exits_cleanly
from sipa_core.params import read_section


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    cfg = read_section(args.params, "prepare", PREPARE_SCHEMA)
    m = prepare(cfg, params_file=args.params)
    print(
        f"prepare: {m['train_images']} train / {m['val_images']} val / {m['test_images']} test images, "
        f"{m['num_classes']} classes, {m['image_height']}x{m['image_width']} -> {cfg['out']}"
    )


if __name__ == "__main__":
    main()
