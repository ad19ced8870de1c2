"""DVC stage ``search``: hyperopt search of block arguments and scaling coefficients (or a preset).

    python stages/search.py [--params params.yaml]
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
from sipa_core.search import read_config, search


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    cfg = read_config(args.params)
    m = search(cfg, params_file=args.params)
    print(f"search ({m['method']}, {m['trials']} trials): accuracy {m['accuracy']:.4f}, score {m['score']:.6f}"
          f" -> {cfg['out_arch']}")


if __name__ == "__main__":
    main()
