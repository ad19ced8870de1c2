"""What running at 16 bits costs: a checkpoint's accuracy evaluated in fp32, with only its weights
through fp16 (how the 16-bit rows were evaluated before), and run at 16 bits (weights, input and
every module's output through fp16: how every stage evaluates a 16-bit row now).

    python benchmarks/sixteen_bit_gap.py models/improve.pt models/prune.pt --data data/prepared/dataset.pt
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipa_core.checkpoint import load_model  # noqa: E402
from sipa_core.data.prepared import load_prepared  # noqa: E402
from sipa_core.train.evaluation import accuracy, predict, round_to_fp16  # noqa: E402


def weights_through_fp16(model: torch.nn.Module) -> torch.nn.Module:
    clone = copy.deepcopy(model)
    round_to_fp16(clone)
    return clone


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", default="data/prepared/dataset.pt")
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    args = ap.parse_args(argv)
    data = load_prepared(args.data)
    print("| checkpoint | split | fp32 | fp16 weights | run at 16 bits | 16 bits - fp32 (pp) | predictions changed |")
    print("|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        model = load_model(path)[0].eval()
        for split in args.splits:
            x, y = data.split(split)
            logits = {"fp32": predict(model, x, data.mean, data.std),
                      "weights": predict(weights_through_fp16(model), x, data.mean, data.std),
                      "16": predict(model, x, data.mean, data.std, fp16=True)}
            acc = {k: accuracy(v, y) for k, v in logits.items()}
            changed = float((logits["16"].argmax(1) != logits["fp32"].argmax(1)).float().mean())
            print(f"| {path} | {split} ({len(y)}) | {100 * acc['fp32']:.2f}% | {100 * acc['weights']:.2f}% | "
                  f"{100 * acc['16']:.2f}% | {100 * (acc['16'] - acc['fp32']):+.2f} | {100 * changed:.2f}% |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
