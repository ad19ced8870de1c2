"""The report stage: the paper's Table 1 for this run, and ``metrics/summary.json``.

Reads each stage's metrics file and writes one row per stage (accuracy,
parameters, math ops, parameter score, ops score, total), with the
reference rows (WideResNet-28-10 = 1.0 + 1.0, and the paper's four rows)
below for comparison, and each stage's network measured in onnxruntime on
the CPU beside its score (``stage_latency.py``; ``report.latency: null``
leaves those columns empty). It re-runs alone when only its own parameters
change.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from sipa_core.errors import SipaError
from sipa_core.io import atomic_write_bytes, atomic_write_csv, atomic_write_text, publish_metrics
from sipa_core.pareto import (COLUMNS as PARETO_COLUMNS, accuracy_range, merge_labels, pareto_figure, pareto_rows,
                              place, run_points)
from sipa_core.paths import path_fields, read_params
from sipa_core.params import Field, check_section
from sipa_core.stage_latency import DEFAULT_LATENCY, check_latency, stage_speeds
from sipa_core.stage_runner import Stage

STAGES = ("search", "improve", "prune", "accelerate", "quantize")
STAGE_TITLES = {"search": "Searching", "improve": "Improving", "prune": "Pruning", "accelerate": "Accelerating",
                "quantize": "Quantizing"}

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
# The 2019 MicroNet CIFAR-100 leaderboard (micronet-challenge.github.io; accuracy >= 80% required), as it scored them.
LEADERBOARD = [
    (1, 0.0044, "DenseNet-100 distilled, 75% pruned, 4-bit weights and activations; additions by adder tree "
                "(about 0.0085 with 32-bit additions, the team's own figure)"),
    (2, 0.0054, "MobileNetV3-style blocks, 60% pruned, not quantized; 80.07%"),
    (3, 0.0056, "-"),
    (4, 0.0058, "SIPA, not quantized; 80.04%"),
    (5, 0.0108, "-"),
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
    "latency": Field(dict, dict(DEFAULT_LATENCY), nullable=True, check=check_latency,
                     help="each stage's network timed in onnxruntime on the CPU: intra-op threads, single-image "
                          "calls (batch 1), the large batch, interleaved rounds; null: not measured"),
    **path_fields('report', prune_rounds=("prune", "rounds_table"), accelerate_exits=("accelerate", "table"),
                  quantize_widths=("quantize", "table"), data=("prepare", "out"), search_model=("search", "out"),
                  improve_model=("improve", "out"), prune_model=("prune", "out"),
                  accelerate_model=("accelerate", "out"), quantize_model=("quantize", "out"),
                  quantize_onnx=("quantize", "onnx")),
}
TABLE_KEYS = {"prune": "prune_rounds", "accelerate": "accelerate_exits", "quantize": "quantize_widths"}


def read_config(params_path: str | Path) -> dict:
    data = read_params(params_path)
    cfg = check_section(data.get("report"), REPORT_SCHEMA, file=params_path, section="report")
    if cfg["latency"] is not None:
        cfg["latency"] = {**DEFAULT_LATENCY, **cfg["latency"]}
    return cfg


def _fmt_count(n: float | None, unit: str) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.3f}B" if unit == "B" else f"{n / 1e6:.3f}M"


def _fmt_cost(r: dict) -> str:
    images, seconds = r.get("images_trained"), r.get("wall_time_s")
    return (f"{'-' if images is None else f'{images / 1e6:.2f}M'} | "
            f"{'-' if seconds is None else f'{seconds:,.0f} s'}")


def _f6(x: float | None) -> str:
    return "-" if x is None else f"{x:.6f}"


def _fmt_speed(r: dict) -> str:
    ms, ips = r.get("ms_batch1"), r.get("images_per_s")
    return f"{'-' if ms is None else f'{ms:.3f}'} | {'-' if ips is None else f'{ips:,.0f}'}"


def table_markdown(rows: list[dict], title: str, cost: dict | None = None, latency: dict | None = None) -> str:
    batch = latency["batch"] if latency else DEFAULT_LATENCY["batch"]
    lines = [f"# {title}", "",
             "| stage | accuracy | parameters (n) | math ops (n) | parameters (s) | math ops (s) | total "
             f"| total (adder tree) | batch 1 (ms) | batch {batch} (images/s) | training images | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.2%}"
        lines.append(f"| {r['stage']} | {acc} | {_fmt_count(r['params'], 'M')} | {_fmt_count(r['ops'], 'B')} | "
                     f"{r['params_score']:.6f} | {r['ops_score']:.6f} | {r['score']:.6f} | "
                     f"{_f6(r.get('score_tree'))} | {_fmt_speed(r)} | {_fmt_cost(r)} |")
    if cost:
        lines += ["", f"Pipeline cost: {cost['images_trained']:,} training images processed, "
                      f"{cost['pipeline_wall_time_s']:,.0f} s of stage wall time (prepare included)."]
    lines += ["", "Parameters (n) are 32-bit-equivalent counts (bytes / 4) and math ops (n) 32-bit-equivalent "
              "operations per image, by the MicroNet rules; (s) are normalised by WideResNet-28-10. "
              "Accuracy is top-1 on this run's test split, the network run at 16 bits (a quantizing row: at "
              "its own widths, the rest at 16 bits); the paper's rows are CIFAR-100. Total: every addition "
              "counted at 32 bits (the strict "
              "accounting); total (adder tree): a layer's accumulation counted as the 2019 entries counted it "
              "(docs/scoring.md). Training images: every image each stage's trainings processed (epochs x "
              "images per epoch).", "", _latency_note(latency)]
    return "\n".join(lines) + "\n"


def _latency_note(latency: dict | None) -> str:
    if latency is None:
        return "Latency not measured (report.latency: null)."
    import onnxruntime  # noqa: PLC0415 (heavy, only for its version)

    return (f"Batch 1 / batch {latency['batch']}: each stage's network in onnxruntime {onnxruntime.__version__} on "
            f"this machine's CPU, {latency['threads']} threads, every graph optimisation, measured when the report "
            f"ran: median milliseconds per test image at batch 1 ({latency['singles']} calls) and images per "
            f"second over the test split (median of {latency['rounds']} rounds), all networks interleaved; the "
            f"float stages as exported from PyTorch, the quantizing stage's integer graph; a kept exit runs "
            f"adaptively. Measured, not counted: they move with the machine and its load.")


def leaderboard_markdown(final: dict | None) -> str:
    """The 2019 leaderboard (CIFAR-100) beside this run's final network under both accountings."""
    lines = ["", "## Beside the 2019 MicroNet CIFAR-100 leaderboard", "",
             "Not comparable as results: the leaderboard is CIFAR-100 at 80% or more; this run is its own data "
             "and accuracy. Comparable as counts when the accounting is the same.", "",
             "| entry | score | how it was counted |", "|---|---|---|"]
    lines += [f"| #{rank} (CIFAR-100) | {score:.4f} | {how} |" for rank, score, how in LEADERBOARD]
    if final is not None:
        acc = "-" if final.get("accuracy") is None else f"{final['accuracy']:.2%}"
        lines.append(f"| this run: {final['stage']} ({acc}) | {final['score']:.6f} | every addition at 32 bits "
                     f"(strict); {_f6(final.get('score_tree'))} by adder tree |")
    return "\n".join(lines) + "\n"


# The paper's claims, as thresholds this run's test figures are held against (issue "Evidence that
# the method works"); each row says whether it holds here.
PRUNE_MIN_REMOVED, PRUNE_MAX_LOSS = 0.50, 0.01
EXIT_MIN_SAVING, EXIT_MAX_LOSS = 0.15, 0.005


def _pp(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f} pp"


def _verdict(ok: bool | str | None) -> str:
    if isinstance(ok, str):
        return ok
    return "not measured" if ok is None else ("holds" if ok else "does not hold")


def _counted_claim(m: dict) -> tuple:
    """The quantized network under both accountings beside the 2019 winner: a count, not a claim."""
    claim = "The quantized network, counted as the 2019 leaderboard counted (adder tree)"
    if m.get("score_tree") is None:
        return claim, "no adder-tree score recorded", None
    below = "below" if m["score_tree"] < LEADERBOARD[0][1] else "above"
    figures = (f"W{m['weight_bits']}A{m['act_bits']}, test {m['accuracy']:.2%}: score {m['score']:.6f} with every "
               f"addition at 32 bits, {m['score_tree']:.6f} by adder tree, {below} the 2019 winner's "
               f"{LEADERBOARD[0][1]} (CIFAR-100 at 80%: not comparable as a result)")
    return claim, figures, "a count, not a claim"


def _improve_claim(m: dict) -> tuple:
    claim = "Improving beats its own base recipe at equal epochs"
    base = m.get("base_accuracy")
    if m.get("base_is_final"):
        return claim, (f"no technique was adopted on validation: the final network is the base recipe's "
                       f"({m['accuracy']:.2%})"), "nothing adopted"
    gain = None if base is None else m["accuracy"] - base
    figures = ("base recipe not trained (improve.compare_base: false)" if base is None else
               f"improved {m['accuracy']:.2%} against base {base:.2%} ({_pp(gain)})")
    return claim, figures, None if gain is None else gain > 0


def _prune_claim(m: dict, before: dict | None) -> tuple:
    removed = m.get("weight_sparsity", m.get("sparsity"))
    counted = None if before is None else 1 - m["params"] / before["params"]
    change = m.get("accuracy_change")
    claim = (f"Pruning removes at least {PRUNE_MIN_REMOVED:.0%} of the parameters with at most "
             f"{100 * PRUNE_MAX_LOSS:g} pp test accuracy loss")
    if removed is None or change is None:
        return claim, "no sparsity or accuracy change recorded", None
    figures = (f"{removed:.1%} of the prunable weights removed"
               + ("" if counted is None else f" ({counted:.1%} of the counted parameter bytes)")
               + f", test accuracy {_pp(change)} against its input")
    ok = removed >= PRUNE_MIN_REMOVED and change >= -PRUNE_MAX_LOSS - 1e-12
    return claim, figures, ok


def _exit_claim(m: dict) -> tuple:
    saving, change = m.get("ops_saving"), m.get("accuracy_change")
    claim = (f"The exit cuts expected ops by at least {EXIT_MIN_SAVING:.0%} with at most "
             f"{100 * EXIT_MAX_LOSS:g} pp loss")
    if saving is None or change is None:
        return claim, "no exit figures recorded", None
    figures = (f"expected ops {-100 * saving:+.1f}% (exit ratio {m.get('exit_ratio') or 0:.1%}), "
               f"test accuracy {_pp(change)} against the main network")
    if m.get("passthrough"):
        figures = "no exit kept: " + (f"the best exit's score {m['best_exit_score']:.6f} is above the network's "
                                      f"own {m['score']:.6f} (chosen on validation)" if m.get("best_exit_score")
                                      else "no exit meets the validation target")
    ok = saving >= EXIT_MIN_SAVING and change >= -EXIT_MAX_LOSS - 1e-12
    return claim, figures, ok


def _loss_claim(m: dict, info: dict | None) -> tuple:
    claim = "Softsmoothing exits beat cross-entropy exits (lower AURC, more images out at the same target)"
    ss, ce = m.get("aurc_softsmoothing"), m.get("aurc_cross_entropy")
    if m.get("passthrough"):
        return claim, "no exit kept, so no exit was compared", None
    if ss is None or ce is None:
        return claim, "one loss only (accelerate.compare_loss: false)", None
    own = (info or {}).get("loss")
    if own not in ("softsmoothing", "cross_entropy"):
        return claim, "the chosen exit's loss is not recorded in the stage's run information", None
    # The chosen loss's exit is the stage's own keys; the compared one's carry its name.
    other = "cross_entropy" if own == "softsmoothing" else "softsmoothing"
    ratios = {own: m.get("exit_ratio"), other: m.get(f"{other}_exit_ratio")}
    accs = {own: m.get("accuracy"), other: m.get(f"{other}_accuracy")}
    r_ss, r_ce = ratios.get("softsmoothing"), ratios.get("cross_entropy")
    fmt = lambda r, a: "no threshold meets the target" if r is None else f"{r:.1%} out, test {a:.2%}"  # noqa: E731
    figures = (f"AURC {ss:.4f} against {ce:.4f}; at the validation target: softsmoothing "
               f"{fmt(r_ss, accs.get('softsmoothing'))}, cross-entropy {fmt(r_ce, accs.get('cross_entropy'))}")
    ok = ss < ce and (r_ss or 0) >= (r_ce or 0)
    return claim, figures, ok


def claims_markdown(stages: dict[str, dict], infos: dict[str, dict | None] | None = None) -> str:
    """The paper's claims against this run's test figures, one row each (``infos``: each stage's
    run information, where the names it chose are recorded)."""
    rows = []
    if "improve" in stages:
        rows.append(_improve_claim(stages["improve"]))
    if "prune" in stages:
        rows.append(_prune_claim(stages["prune"], stages.get("improve")))
    if "accelerate" in stages:
        rows += [_exit_claim(stages["accelerate"]), _loss_claim(stages["accelerate"], (infos or {}).get("accelerate"))]
    if "quantize" in stages:
        rows.append(_counted_claim(stages["quantize"]))
    lines = ["# The paper's claims on this run (test split; every choice made on validation)", "",
             "| claim | measured | verdict |", "|---|---|---|"]
    lines += [f"| {c} | {f} | {_verdict(ok)} |" for c, f, ok in rows]
    return "\n".join(lines) + "\n"


def stages_figure(rows: list[dict], references: list[dict]) -> bytes:
    """A PNG: test accuracy against score of the run's stages, in pipeline order; the paper's
    stages (CIFAR-100, not comparable as results) in a side panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (heavy, only here)
    from matplotlib.figure import Figure  # noqa: PLC0415

    panels = [("this run", rows)] + ([("the paper (CIFAR-100)", references)] if references else [])
    fig = Figure(figsize=(5.2 * len(panels), 4.2), dpi=110, layout="constrained")
    for i, (title, points) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        shown = [r for r in points if r.get("accuracy") is not None]
        floor, top = accuracy_range([100 * r["accuracy"] for r in shown])
        placed = [(r["score"], *place(100 * r["accuracy"], r["stage"].replace(" (paper)", ""), floor))
                  for r in shown]
        colour = "tab:blue" if i == 0 else "tab:gray"
        ax.plot([x for x, *_ in placed], [y for _, y, *_ in placed], "-", color=colour, alpha=0.8)
        for x, y, marker, _ in placed:
            ax.plot(x, y, marker, color=colour, alpha=0.8)
        for k, (x, y, label) in enumerate(merge_labels([(x, y, label) for x, y, _, label in placed])):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4 if k % 2 == 0 else -11),
                        fontsize=8)  # labels alternate above and below
        ax.set(title=title, xlabel="MicroNet score (lower is better)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.25)
        ax.set_ylim(floor, top)
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})
    return buf.getvalue()


def reference_notes() -> list[str]:
    """The paper's stages and the 2019 leaderboard, as lines under the Pareto figure."""
    paper = "; ".join(f"{r['stage'].removesuffix(' (paper)')} {100 * r['accuracy']:.2f}% at {r['score']:.6f}"
                      for r in PAPER_ROWS)
    board = "; ".join(f"#{rank} {score}" for rank, score, _ in LEADERBOARD)
    return ["CIFAR-100, another data set (not comparable as results):",
            f"the paper (strict): {paper}",
            f"2019 leaderboard, all at 80%: {board} (#1 counted its additions by adder tree, about 0.0085 strict)"]


SCORE_KEYS = ("accuracy", "params", "ops", "params_score", "ops_score", "score")


def _read_json(path: Path, missing: str) -> dict:
    if not path.is_file():
        raise SipaError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SipaError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def _stage_metrics(cfg: dict, params_file: str) -> dict[str, dict]:
    stages = {}
    for stage in cfg["stages"]:
        path = Path(cfg["metrics_dir"]) / f"{stage}.json"
        m = _read_json(path, f"{params_file}: report.stages: {path} not found; run the {stage} stage first")
        missing = [k for k in SCORE_KEYS if k not in m]
        if missing:
            raise SipaError(f"{path}: metrics lack {', '.join(missing)}")
        stages[stage] = m
    return stages


def report(cfg: dict, *, params_file: str = "params.yaml", progress=None) -> dict:
    started = time.time()
    stages = _stage_metrics(cfg, params_file)
    speeds = stage_speeds(cfg, list(stages)) if cfg["latency"] and stages else {}
    rows = [{"stage": STAGE_TITLES[s] + (" (chosen on test)" if m.get("chosen_on_test") else "")
             + (f" (W{m['weight_bits']}A{m['act_bits']})" if s == "quantize" else ""),
             **{k: m[k] for k in SCORE_KEYS}, "score_tree": m.get("score_tree"),
             "ms_batch1": speeds[s].ms_batch1 if s in speeds else None,
             "images_per_s": speeds[s].images_per_s if s in speeds else None,
             "images_trained": m.get("images_trained"), "wall_time_s": m.get("wall_time_s")} for s, m in stages.items()]
    out_rows = rows + ([REFERENCE_ROW] + PAPER_ROWS if cfg["references"] else [])
    cost = {"images_trained": sum(m.get("images_trained") or 0 for m in stages.values()),
            "pipeline_wall_time_s": round(sum(m.get("wall_time_s", 0) for m in stages.values())
                                          + _prepare_seconds(cfg["metrics_dir"]), 2)}
    atomic_write_text(cfg["table"], table_markdown(out_rows, cfg["title"], cost, cfg["latency"])
                      + (leaderboard_markdown(rows[-1] if rows else None) if cfg["references"] else ""))
    atomic_write_csv(cfg["table_csv"], rows, ["stage", *SCORE_KEYS, "ms_batch1", "images_per_s"])
    runs = _stage_info(cfg)
    atomic_write_text(cfg["claims"], claims_markdown(stages, runs))
    atomic_write_bytes(cfg["figure"], stages_figure(rows, PAPER_ROWS if cfg["references"] else []))
    points = run_points(stages, {s: Path(cfg[key]) for s, key in TABLE_KEYS.items() if s in stages},
                        {s: v.ms_batch1 for s, v in speeds.items()})
    atomic_write_csv(cfg["pareto_csv"], pareto_rows(points), PARETO_COLUMNS)
    atomic_write_bytes(cfg["pareto"], pareto_figure(points, reference_notes() if cfg["references"] else []))
    summary = {}
    if rows:
        first, final = rows[0], rows[-1]
        summary.update({k: final[k] for k in ("accuracy", "score", "params_score", "ops_score")},
                       **({"score_tree": final["score_tree"]} if final.get("score_tree") is not None else {}),
                       compression_params=first["params_score"] / final["params_score"],
                       compression_ops=first["ops_score"] / final["ops_score"], **_speed_summary(rows))
    summary.update(wall_time_s=round(time.time() - started, 2), **cost)
    info = {"final_stage": cfg["stages"][-1] if cfg["stages"] else None,
            "stages": {s: {k: m[k] for k in SCORE_KEYS} for s, m in stages.items()},
            "runs": runs}
    publish_metrics(cfg["summary"], {**summary, **info}, cfg["info"])
    return {**summary, **info}


def _speed_summary(rows: list[dict]) -> dict:
    """The final network's measured speed, and how much faster it runs than the improved network
    (the first measured row when the improving stage is not in the table)."""
    final = rows[-1]
    if final.get("ms_batch1") is None:
        return {}
    measured = [r for r in rows if r.get("ms_batch1") is not None]
    base = next((r for r in measured if r["stage"].startswith(STAGE_TITLES["improve"])), measured[0])
    return {"ms_batch1": final["ms_batch1"], "images_per_s": final["images_per_s"],
            "speedup_batch1": base["ms_batch1"] / final["ms_batch1"],
            "speedup_batch": final["images_per_s"] / base["images_per_s"]}


def _stage_info(cfg: dict) -> dict:
    """Each stage's run information (seed, device, versions), where it exists."""
    out = {}
    for stage in cfg["stages"]:
        path = Path(cfg["info_dir"]) / f"{stage}.json"
        try:
            out[stage] = json.loads(path.read_text())
        except (OSError, ValueError):
            out[stage] = None
    return out


def _prepare_seconds(metrics_dir) -> float:
    path = Path(metrics_dir) / "prepare.json"
    try:
        return float(json.loads(path.read_text()).get("wall_time_s", 0))
    except (OSError, ValueError, TypeError):
        return 0.0


def summary(cfg: dict, m: dict) -> str:
    return (f"report: {m['final_stage']} accuracy {m['accuracy']:.4f}, score {m['score']:.6f} "
            f"(params {m['params_score']:.6f} + ops {m['ops_score']:.6f}) -> {cfg['table']}, {cfg['summary']}")


STAGE = Stage("report", __doc__, read_config, report, summary, trains=False)
