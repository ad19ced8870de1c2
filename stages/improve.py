"""DVC stage ``improve``: greedy selection of training techniques, then the final training.

    python stages/improve.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import sipa_core  # noqa: F401 - installed with pip install -e .
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipa_core.errors import exits_cleanly
from sipa_core.improve import improve, read_config


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    cfg = read_config(args.params)
    m = improve(cfg, params_file=args.params)
    base = f", base recipe {m['base_accuracy']:.4f}" if "base_accuracy" in m else ""
    print(f"improve: adopted {m['adopted']}; test accuracy {m['accuracy']:.4f}{base}; score {m['score']:.6f}")


if __name__ == "__main__":
    main()
