"""The report stage: the paper's Table 1 for this run, and ``metrics/summary.json``.

Reads each stage's metrics file and writes one row per stage (accuracy,
parameters, math ops, parameter score, ops score, total), with the
reference rows (WideResNet-28-10 = 1.0 + 1.0, and the paper's four rows)
below for comparison. Only reads files: it re-runs alone when only its own
parameters change.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sipa_core.errors import SipaError
from sipa_core.io import atomic_write_json, atomic_write_text
from sipa_core.paths import path_fields
from sipa_core.params import Field, check_section, load_yaml
from sipa_core.stage_runner import Stage

STAGES = ("search", "improve", "prune", "accelerate")
STAGE_TITLES = {"search": "Searching", "improve": "Improving", "prune": "Pruning", "accelerate": "Accelerating"}

# The paper's Table 1 (CIFAR-100; parameters and FLOPS as printed there).
PAPER_ROWS = [
    {"stage": "Searching (paper)", "accuracy": 0.7347, "params": 0.238e6, "ops": 0.089e9,
     "params_score": 0.006534, "ops_score": 0.008447, "score": 0.014981},
    {"stage": "Improving (paper)", "accuracy": 0.8047, "params": 0.238e6, "ops": 0.089e9,
     "params_score": 0.006534, "ops_score": 0.008447, "score": 0.014981},
    {"stage": "Pruning (paper)", "accuracy": 0.8005, "params": 0.103e6, "ops": 0.034e9,
     "params_score": 0.002833, "ops_score": 0.003267, "score": 0.006100},
    {"stage": "Accelerating (paper)", "accuracy": 0.8004, "params": 0.109e6, "ops": 0.029e9,
     "params_score": 0.002995, "ops_score": 0.002803, "score": 0.005798},
]
REFERENCE_ROW = {"stage": "WideResNet-28-10 (reference)", "accuracy": None, "params": 36.5e6, "ops": 10.49e9,
                 "params_score": 1.0, "ops_score": 1.0, "score": 2.0}


def _stage_list(value) -> str | None:
    bad = [v for v in value if v not in STAGES]
    if bad:
        return f"unknown stage {bad[0]!r}; known: {', '.join(STAGES)}"
    return None


REPORT_SCHEMA = {
    "stages": Field(list, list(STAGES), check=_stage_list, help="stages whose metrics form the table"),
    "references": Field(bool, True, help="add WideResNet-28-10 and the paper's rows"),
    "title": Field(str, "SIPA: MicroNet scores per stage"),
    **path_fields('report'),
}


def read_config(params_path: str | Path) -> dict:
    data = load_yaml(params_path)
    return check_section(data.get("report"), REPORT_SCHEMA, file=params_path, section="report")


def _fmt_count(n: float | None, unit: str) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.3f}B" if unit == "B" else f"{n / 1e6:.3f}M"


def table_markdown(rows: list[dict], title: str) -> str:
    lines = [f"# {title}", "",
             "| stage | accuracy | parameters (n) | math ops (n) | parameters (s) | math ops (s) | total |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.2%}"
        lines.append(f"| {r['stage']} | {acc} | {_fmt_count(r['params'], 'M')} | {_fmt_count(r['ops'], 'B')} | "
                     f"{r['params_score']:.6f} | {r['ops_score']:.6f} | {r['score']:.6f} |")
    lines += ["", "Parameters (n) are 32-bit-equivalent counts (bytes / 4) and math ops (n) 32-bit-equivalent "
              "operations per image, by the MicroNet rules; (s) are normalised by WideResNet-28-10. "
              "Accuracy is top-1 on this run's test split with 16-bit weights; the paper's rows are CIFAR-100."]
    return "\n".join(lines) + "\n"


def report(cfg: dict, *, params_file: str = "params.yaml", progress=None) -> dict:
    started = time.time()
    rows, stages = [], {}
    for stage in cfg["stages"]:
        path = Path(cfg["metrics_dir"]) / f"{stage}.json"
        if not path.is_file():
            raise SipaError(f"{params_file}: report.stages: {path} not found; run the {stage} stage first")
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SipaError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        missing = [k for k in ("accuracy", "params", "ops", "params_score", "ops_score", "score") if k not in m]
        if missing:
            raise SipaError(f"{path}: metrics lack {', '.join(missing)}")
        stages[stage] = m
        title = STAGE_TITLES[stage] + (" (chosen on test)" if m.get("chosen_on_test") else "")
        rows.append({"stage": title, **{k: m[k] for k in ("accuracy", "params", "ops", "params_score", "ops_score",
                                                           "score")}})
    out_rows = rows + ([REFERENCE_ROW] + PAPER_ROWS if cfg["references"] else [])
    atomic_write_text(cfg["table"], table_markdown(out_rows, cfg["title"]))
    from sipa_core.io import atomic_write_csv

    atomic_write_csv(cfg["table_csv"], rows, ["stage", "accuracy", "params", "ops", "params_score", "ops_score",
                                              "score"])
    final = rows[-1] if rows else None
    summary = {"stages": {s: {k: stages[s][k] for k in ("accuracy", "params", "ops", "params_score", "ops_score",
                                                         "score")} for s in stages}}
    if final is not None:
        summary.update(final_stage=cfg["stages"][-1], accuracy=final["accuracy"], score=final["score"],
                       params_score=final["params_score"], ops_score=final["ops_score"])
        first = rows[0]
        summary["compression"] = {"params": first["params_score"] / final["params_score"],
                                  "ops": first["ops_score"] / final["ops_score"]}
    last = stages.get(cfg["stages"][-1], {}) if cfg["stages"] else {}
    summary.update(seed=last.get("seed"), device=last.get("device"), torch=last.get("torch"),
                   python=last.get("python"),
                   wall_time_s=round(time.time() - started, 2),
                   pipeline_wall_time_s=round(sum(s.get("wall_time_s", 0) for s in stages.values())
                                              + _prepare_seconds(cfg["metrics_dir"]), 2))
    atomic_write_json(cfg["summary"], summary)
    return summary


def _prepare_seconds(metrics_dir) -> float:
    path = Path(metrics_dir) / "prepare.json"
    try:
        return float(json.loads(path.read_text()).get("wall_time_s", 0))
    except (OSError, ValueError, TypeError):
        return 0.0


def summary(cfg: dict, m: dict) -> str:
    return (f"report: {m['final_stage']} accuracy {m['accuracy']:.4f}, score {m['score']:.6f} "
            f"(params {m['params_score']:.6f} + ops {m['ops_score']:.6f}) -> {cfg['table']}, {cfg['summary']}")


STAGE = Stage("report", __doc__, read_config, report, summary)
