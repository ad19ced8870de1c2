"""Pruning criteria at equal score: the same rounds to the same strict-score targets
(``prune.target: score``), once per ``prune.normalize`` criterion, from one cached input network
(on the CPU profile, its improved network).

Each criterion is one run of ``stages/prune.py`` (a subprocess, its own state folder, so a killed
comparison resumes where it stopped). Every round of every run lands in one table: its score target,
sparsity, validation and test accuracy, the parameters and ops behind the score (strict and adder
tree). Every round reaches its target score, so the rows of one target compare the criteria at equal
score; nothing here chooses anything.

    python benchmarks/prune_criteria.py --params params.yaml --model models/improve.pt \\
        --workdir criteria --targets 0.0045 0.0033 0.0026 --out criteria/table.md
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import yaml

from sipa_core.io import atomic_write_csv, atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported by the docs' tests

from quantize_ablation import run_stage_once  # noqa: E402

CRITERIA = {"l2": "global |w| / layer L2 norm (the paper's)", "score": "score-aware (|w| / L2 / cost of a weight)",
            "none": "global |w|"}
COLUMNS = ["criterion", "round", "target", "sparsity", "select_accuracy", "accuracy", "accuracy_change", "params",
           "ops", "params_score", "ops_score", "score", "score_tree"]


def criterion_params(base: dict, criterion: str, targets: list[float], model: str, folder: Path) -> dict:
    """The prune section of one run: the base section, a score schedule, the criterion."""
    cfg = {**base, "normalize": criterion, "target": "score", "schedule": targets, "preset": None,
           "scope": "global", "granularity": "weight", "model": model}
    cfg.update({key: str(folder / rel) for key, rel in (
        ("out", "prune.pt"), ("state", "state"), ("metrics", "metrics.json"), ("info", "info.json"),
        ("rounds_table", "rounds.csv"), ("layers_table", "layers.csv"))})
    return cfg


def run_criterion(params: dict, criterion: str, args) -> list[dict]:
    folder = Path(args.workdir) / criterion
    run_stage_once("prune", params, criterion_params(params.get("prune", {}), criterion, args.targets, args.model,
                                                     folder), folder)
    with open(folder / "rounds.csv", newline="") as f:
        rounds = [r for r in csv.DictReader(f) if int(r["round"]) > 0]
    return [{"criterion": criterion, **{k: r.get(k, "") for k in COLUMNS[1:]}} for r in rounds]


def markdown(rows: list[dict]) -> str:
    pct = lambda v: f"{100 * float(v):.2f}"  # noqa: E731
    lines = ["| score target | criterion | sparsity | val % | test % | change vs input (pp) | params | ops | "
             "score | score (adder tree) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-float(r["target"]), r["criterion"])):
        lines.append(f"| {float(r['target']):.4f} | {r['criterion']} | {pct(r['sparsity'])}% | "
                     f"{pct(r['select_accuracy'])} | {pct(r['accuracy'])} | {100 * float(r['accuracy_change']):+.2f} "
                     f"| {float(r['params']):,.0f} | {float(r['ops']):,.0f} | {float(r['score']):.6f} | "
                     f"{float(r['score_tree']):.6f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", required=True, help="the profile's params.yaml (its prepare output must exist)")
    ap.add_argument("--model", required=True, help="the pruning stage's input checkpoint")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--targets", nargs="+", type=float, required=True, help="strict scores, falling, one per round")
    ap.add_argument("--criteria", nargs="+", default=["l2", "score"], choices=list(CRITERIA))
    ap.add_argument("--out", required=True, help="markdown table (a CSV beside it)")
    args = ap.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    rows = [row for criterion in args.criteria for row in run_criterion(params, criterion, args)]
    out = atomic_write_text(args.out, markdown(rows))
    atomic_write_csv(out.with_suffix(".csv"), rows, COLUMNS)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
