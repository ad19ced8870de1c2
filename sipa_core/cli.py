"""The ``sipa`` command line: the parser, and ``main`` that hands a parsed command to
``sipa_core.commands``."""

from __future__ import annotations

import argparse
import sys

from sipa_core.errors import exits_cleanly


def _add_accounting(value: str):
    """--add-bits: a width 1..32, int or tree."""
    if value.isdigit() and 1 <= int(value) <= 32:
        return int(value)
    if value in ("int", "tree"):
        return value
    raise argparse.ArgumentTypeError(f"expected a width from 1 to 32, int or tree, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sipa", description="SIPA: efficient networks under a MicroNet budget.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="count a model's parameters and math ops by the MicroNet rules")
    s.add_argument("--arch", help="registered architecture name (see `sipa archs`), an architecture .yaml, "
                                  "torchvision:<name>, timm:<name> or file.py:function (docs/networks.md)")
    s.add_argument("--checkpoint", help="sipa checkpoint (holds its architecture) or a state_dict with --arch")
    s.add_argument("--bits", type=int, default=16, help="bits per value: 16 = the freebie (default), 32, or fewer")
    s.add_argument("--weight-bits", type=int, default=None, metavar="W", help="weight width (default: --bits)")
    s.add_argument("--act-bits", type=int, default=None, metavar="A", help="activation width (default: --bits)")
    s.add_argument("--add-bits", type=_add_accounting, default=32, metavar="B",
                   help="additions: a width (32, the strict default; 16) or the 2019 entries' accounting of "
                        "a layer's accumulation, int or tree (the adder-tree score is always shown too)")
    s.add_argument("--layer-bits", action="append", default=[], metavar="PATTERN=W[:A]",
                   help="widths of the layers a module-name pattern covers, e.g. stem=8 classifier=8:8 (repeatable)")
    s.add_argument("--uniform-sparsity", type=float, default=None, metavar="S",
                   help="count as if every weight tensor (ndim > 1) had sparsity S (planning estimate)")
    s.add_argument("--global-sparsity", type=float, default=None, metavar="S",
                   help="first remove a fraction S of the weights as the pruning stage does (global threshold on "
                        "L2-normalised magnitudes), then count: what a global prune to S would score")
    s.add_argument("--num-classes", type=int, default=None, help="override the architecture's class count")
    s.add_argument("--input-size", type=int, default=None,
                   help="the data's image size: --arch builds the network for it (default: the spec's; a "
                        "checkpoint is counted at its own)")
    s.add_argument("--layers", action="store_true", help="also show the per-layer table and block costs")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--exit-after", type=int, default=None, metavar="BLOCK",
                   help="add the paper's exit module after this block (a checkpoint with an exit uses its own)")
    s.add_argument("--exit-width", type=int, default=None, help="exit 1x1 width (default: the head width)")
    s.add_argument("--exit-ratio", type=float, default=None, metavar="R",
                   help="fraction of samples leaving at the exit (default: the checkpoint's, else 0)")
    s.set_defaults(run="score")
    c = sub.add_parser("check-params", help="check every stage's section of a params file")
    c.add_argument("file", nargs="?", default="params.yaml")
    c.add_argument("--resolved", action="store_true",
                   help="print every training's effective recipe (after presets, inheritance, overrides)")
    c.set_defaults(run="check_params")
    pl = sub.add_parser("plan", help="the trainings a params file will run, their images and estimated time")
    pl.add_argument("file", nargs="?", default="params.yaml")
    pl.add_argument("--throughput", type=float, default=None, metavar="IMG_PER_S",
                    help="training images per second to estimate the wall time with")
    pl.add_argument("--measure", action="store_true",
                    help="without --throughput: measure it here with a short timed run (the base recipe's network)")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.set_defaults(run="plan")
    a = sub.add_parser("archs", help="list the registered architectures")
    a.set_defaults(run="archs")
    r = sub.add_parser("config-reference",
                       help="print the configuration reference (every params key) generated from the stage schemas")
    r.add_argument("--check", metavar="FILE", default=None,
                   help="print nothing; exit 1 with one line if FILE differs from the reference")
    r.set_defaults(run="config_reference")
    return p


@exits_cleanly
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from sipa_core import commands  # noqa: PLC0415 (torch and every stage: `sipa --help` stays instant)

    return getattr(commands, f"cmd_{args.run}")(args)


if __name__ == "__main__":
    sys.exit(main())
