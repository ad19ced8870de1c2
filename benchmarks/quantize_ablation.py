"""The quantizing stage's ablation: today's quantizers, each change alone, then all together,
at the given widths, from one cached input network (the quantizing stage's input: on the CPU
profile, its accelerated network, which is the pruned network without an exit).

Each variant is one run of ``stages/quantize.py`` (a subprocess, its own state folder, so a
killed ablation resumes where it stopped); the table holds validation and test accuracy, the
float input's accuracy and both score accountings. Every figure is on validation or test
data; nothing here chooses anything.

    python benchmarks/quantize_ablation.py --params params.yaml --model models/accelerate.pt \\
        --workdir ablation --widths W4A4 W4A8 --out ablation/table.md
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import yaml

from sipa_core.io import atomic_write_text
from sipa_core.quantize.config import read_config
from sipa_core.quantize.training import schedule_steps

ROOT = Path(__file__).resolve().parents[1]
FIRST_LAST_8 = {"stem": [8, 8], "classifier": [8, 8]}
TODAY = {"act_quantizers": "signed", "weight_scale": "stats", "scale_lr": None, "layers": {}, "schedule": []}
VARIANTS = {  # name -> (what it changes, quantize overrides on top of TODAY)
    "today": ("signed inputs, max-|w| weight scales", {}),
    "fitted": ("activation quantizers fitted to their inputs", {"act_quantizers": "fitted"}),
    "learned": ("learned weight scales (MSE init), scales at lr 1e-3 without decay",
                {"weight_scale": "learned", "scale_lr": 1e-3}),
    "distill": ("distillation from the float input (w 0.5, T 4)", {"recipe": {"distill_weight": 0.5}}),
    "first_last_8": ("stem and classifier at W8A8", {"layers": FIRST_LAST_8}),
    "longer": ("10 QAT epochs", {"epochs": 10}),
    "all": ("all of the above, 10 epochs", {"act_quantizers": "fitted", "weight_scale": "learned", "scale_lr": 1e-3,
                                            "recipe": {"distill_weight": 0.5}, "layers": FIRST_LAST_8,
                                            "epochs": 10}),
    "all_stats": ("all but learned scales (max-|w| statistics), 10 epochs",
                  {"act_quantizers": "fitted", "recipe": {"distill_weight": 0.5}, "layers": FIRST_LAST_8,
                   "epochs": 10}),
    "all_schedule": ("all, widths 8 -> 6 -> final (1 + 1 + 8 epochs)",
                     {"act_quantizers": "fitted", "weight_scale": "learned", "scale_lr": 1e-3,
                      "recipe": {"distill_weight": 0.5}, "layers": FIRST_LAST_8, "epochs": 8,
                      "schedule": [8, 6], "schedule_epochs": 1}),
    "allocated": ("fitted inputs, one width per layer from 8/6/4/2 at the uniform widths' score (--budgets)",
                  {"act_quantizers": "fitted", "layer_widths": "allocated", "width_choices": [8, 6, 4, 2]}),
    "allocated_distill": ("allocated as above, distillation, 10 epochs",
                          {"act_quantizers": "fitted", "layer_widths": "allocated", "width_choices": [8, 6, 4, 2],
                           "recipe": {"distill_weight": 0.5}, "epochs": 10}),
}
COLUMNS = ["variant", "widths", "epochs", "val_accuracy", "accuracy", "input_accuracy", "accuracy_change",
           "main_accuracy_fp32", "score", "score_tree", "what", "allocated_widths"]


def variant_params(base: dict, name: str, label: str, model: str, folder: Path, budget: float | None = None) -> dict:
    """The quantize section of one run: the base section, today's quantizers, the variant's changes
    (``allocated``: under ``budget``, the uniform widths' score)."""
    what, overrides = VARIANTS[name]
    w, a = (int(v) for v in label[1:].split("A"))
    cfg = {**base, **TODAY, **overrides, "weight_bits": w, "act_bits": a, "compare_widths": [], "model": model}
    if name.startswith("allocated"):
        if budget is None:
            raise SystemExit(f"quantize_ablation: allocated at {label} needs --budgets {label}=SCORE")
        cfg["budget"] = budget
    cfg["recipe"] = {**base.get("recipe", {}), **overrides.get("recipe", {})}
    cfg.update({key: str(folder / rel) for key, rel in (
        ("out", "q.pt"), ("onnx", "onnx"), ("state", "state"), ("metrics", "metrics.json"),
        ("info", "info.json"), ("table", "widths.csv"))})
    return cfg


def run_stage_once(stage: str, params: dict, section: dict, folder: Path) -> None:
    """``stages/<stage>.py`` on ``params`` with its section replaced, in ``folder``, unless the run
    there finished (its ``metrics.json`` exists): a killed comparison resumes where it stopped."""
    if (folder / "metrics.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump({**params, stage: section}, sort_keys=False))
    print(f"{folder.name}: running", flush=True)
    subprocess.run([sys.executable, str(ROOT / f"stages/{stage}.py"), "--params", str(folder / "params.yaml")],
                   check=True)


def run_variant(params: dict, name: str, label: str, args) -> dict:
    folder = Path(args.workdir) / f"{name}-{label}"
    cfg = variant_params(params.get("quantize", {}), name, label, args.model, folder, args.budgets.get(label))
    run_stage_once("quantize", params, cfg, folder)
    m = json.loads((folder / "metrics.json").read_text())
    chosen = json.loads((folder / "info.json").read_text()).get("allocated_widths") or {}
    read = read_config(folder / "params.yaml")  # as the stage read it: defaults filled in
    steps = schedule_steps(read, read["widths"])[:-1]  # the steps trained before the final widths
    epochs = read["epochs"] + read["schedule_epochs"] * len(steps)
    return {"variant": name, "widths": label, "epochs": epochs, "what": VARIANTS[name][0],
            **{k: m.get(k) for k in COLUMNS if k in m},
            "allocated_widths": " ".join(f"{n}:{b}" for n, b in chosen.items())}


def markdown(rows: list[dict]) -> str:
    pct = lambda v: "" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = ["| variant | widths | QAT epochs | val % | test % | change vs 16-bit input (pp) | score | "
             "score (adder tree) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['widths']} | {r['epochs']} | {pct(r['val_accuracy'])} | "
                     f"{pct(r['accuracy'])} | {100 * r['accuracy_change']:+.2f} | {r['score']:.6f} | "
                     f"{r['score_tree']:.6f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", required=True, help="the profile's params.yaml (its prepare output must exist)")
    ap.add_argument("--model", required=True, help="the quantizing stage's input checkpoint")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--widths", nargs="+", default=["W4A4", "W4A8"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--budgets", nargs="*", default=[], metavar="WIDTHS=SCORE",
                    help="allocated: the score budget per widths label, e.g. W4A8=0.001667 (the uniform run's score)")
    ap.add_argument("--out", required=True, help="markdown table (a CSV beside it)")
    args = ap.parse_args(argv)
    args.budgets = {label: float(score) for label, score in (b.split("=") for b in args.budgets)}
    params = yaml.safe_load(Path(args.params).read_text())
    rows = [run_variant(params, name, label, args) for label in args.widths for name in args.variants]
    out = atomic_write_text(args.out, markdown(rows))
    with open(out.with_suffix(".csv"), "w", newline="") as f:  # quoted: the descriptions hold commas
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
