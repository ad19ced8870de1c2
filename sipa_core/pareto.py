"""The run's Pareto front: every network the run produced that has a test accuracy (each stage's
result, each pruning round, each exit threshold, each width trained), against its MicroNet score
under both accountings (strict 32-bit additions, and the 2019 entries' adder tree), the networks
that no other network of the run beats on both axes marked. Search trials are left out: they are
measured on validation only (the search's own figure, ``dvc plots show``).

Every choice of the pipeline was made on validation; the front is drawn on test, after the fact,
to show what the run produced, not to choose anything.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

from sipa_core.errors import SipaError

TITLES = {"search": "Searching", "improve": "Improving", "prune": "Pruning", "accelerate": "Accelerating",
          "quantize": "Quantizing"}
COLUMNS = ["stage", "label", "accuracy", "score", "score_tree", "ms_batch1", "chosen", "front", "front_tree"]


@dataclass(frozen=True)
class Point:
    """One network of the run: where it came from, its test accuracy and scores."""

    stage: str
    label: str
    accuracy: float
    score: float
    score_tree: float | None
    chosen: bool  # the stage's result
    ms_batch1: float | None = None  # measured latency (the stages' results only: report.latency)


def _number(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def read_table(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise SipaError(f"{path}: not found; run the stage that writes it first")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _table_points(stage: str, rows: list[dict], label) -> list[Point]:
    out = []
    for r in rows:
        acc, score = _number(r.get("accuracy")), _number(r.get("score"))
        if acc is not None and score is not None:
            out.append(Point(stage, label(r), acc, score, _number(r.get("score_tree")), r.get("chosen") == "yes"))
    return out


def _round_label(r: dict) -> str:
    return f"pruning round {r['round']} ({float(r['sparsity']):.0%} sparse)"


def _exit_label(r: dict) -> str:
    return f"exit after block {r['position']} at threshold {float(r['threshold']):.2f}"  # no comma: a CSV cell


def run_points(stage_metrics: dict[str, dict], tables: dict[str, Path],
               latencies: dict[str, float] | None = None) -> list[Point]:
    """Each stage's result (with its measured milliseconds per image, ``latencies``, where measured),
    then the rows of the pruning, exit and width tables (``tables``: stage -> its table, for the
    stages whose table is read)."""
    latencies = latencies or {}
    points = [Point(s, TITLES[s], m["accuracy"], m["score"], m.get("score_tree"), True, latencies.get(s))
              for s, m in stage_metrics.items() if m.get("accuracy") is not None]
    labels = {"prune": _round_label, "accelerate": _exit_label, "quantize": lambda r: f"{r['widths']} QAT"}
    for stage, path in tables.items():
        rows = read_table(path)
        if stage == "prune":
            rows = [r for r in rows if r.get("round") not in ("0", 0)]  # round 0 is the input network
        points += [p for p in _table_points(stage, rows, labels[stage]) if not p.chosen]  # chosen: the result
    return points


TIE = 1e-6  # accuracies within this are equal (the tables hold 6 significant digits)


def _beats(q: Point, p: Point, key: str) -> bool:
    """``q`` at most ``p``'s score with a higher accuracy, or a lower score and no lower accuracy."""
    xq, xp = getattr(q, key), getattr(p, key)
    return xq is not None and ((xq <= xp and q.accuracy > p.accuracy + TIE)
                               or (xq < xp and q.accuracy >= p.accuracy - TIE))


def front(points: list[Point], key: str = "score") -> list[bool]:
    """Whether each point is on the front: no other point of the run beats it (``_beats``); a point
    without that score is not."""
    return [getattr(p, key) is not None and not any(_beats(q, p, key) for q in points) for p in points]


def pareto_rows(points: list[Point]) -> list[dict]:
    strict, tree = front(points, "score"), front(points, "score_tree")
    return [{**asdict(p), "chosen": "yes" if p.chosen else "no", "front": "yes" if a else "no",
             "front_tree": "yes" if b else "no"} for p, a, b in zip(points, strict, tree)]


SPAN = 15.0  # percentage points of test accuracy a figure shows below its best network


def accuracy_range(accuracies: list[float]) -> tuple[float, float]:
    """A figure's test-accuracy range (%): its networks within ``SPAN`` points of the best, with a
    point of margin, so an untrained search result far below does not squeeze the rest together."""
    if not accuracies:
        return 0.0, 100.0
    top = max(accuracies)
    return min(a for a in accuracies if a >= top - SPAN) - 1.0, top + 1.0


def place(accuracy: float, label: str, floor: float) -> tuple[float, str, str]:
    """Where a network is drawn: its accuracy, or on the floor of the range (marker ``v``, its accuracy
    in the label) when it lies below; returns (y, marker, label)."""
    if accuracy >= floor:
        return accuracy, "o", label
    return floor + 0.3, "v", f"{label} ({accuracy:.1f}%, below)"


def merge_labels(marks: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Labels of networks drawn at the same place joined into one (a stage that passed its input
    through sits on its input): [(x, y, label)] in first-seen order."""
    merged: dict[tuple[float, float], list[str]] = {}
    for x, y, label in marks:
        merged.setdefault((round(x, 9), round(y, 3)), []).append(label)
    return [(x, y, " = ".join(labels)) for (x, y), labels in merged.items()]


PANELS = [("score", "strict: additions at 32 bits", "MicroNet score (lower is better)"),
          ("score_tree", "additions by adder tree (the 2019 entries)", "MicroNet score (lower is better)"),
          ("ms_batch1", "measured: onnxruntime on the CPU, batch 1", "milliseconds per image (lower is better)")]


def pareto_figure(points: list[Point], references: list[str]) -> bytes:
    """A PNG: test accuracy against score, one panel per accounting, and against measured latency
    where the stages were timed; the front as a step line and each stage's result labelled;
    ``references`` (other data sets' figures) as a note under it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (heavy, only here)
    from matplotlib.figure import Figure  # noqa: PLC0415

    panels = PANELS if any(p.ms_batch1 is not None for p in points) else PANELS[:2]
    fig = Figure(figsize=(5.5 * len(panels), 4.8 + 0.16 * len(references)), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    floor, top = accuracy_range([100 * p.accuracy for p in points])
    for ax, (key, title, xlabel) in zip(axes, panels):
        shown = [p for p in points if getattr(p, key) is not None]
        _scatter_stages(ax, shown, key, floor)
        best = sorted((p for p, on in zip(shown, front(shown, key)) if on), key=lambda p: getattr(p, key))
        if best:
            ax.step([getattr(p, key) for p in best], [100 * p.accuracy for p in best], where="post",
                    color="black", lw=1, label="front")
        marks = []
        for p in (p for p in shown if p.chosen):
            y, _, label = place(100 * p.accuracy, p.label, floor)
            marks.append((getattr(p, key), y, label))
        for k, (x, y, label) in enumerate(merge_labels(marks)):  # labels alternate above and below
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4 if k % 2 == 0 else -10),
                        fontsize=7)
        ax.set(title=title, xlabel=xlabel, xscale="log", ylim=(floor, top))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=7, loc="best")
    if references:
        fig.supxlabel("\n".join(references), fontsize=7, ha="left", x=0.01)
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})
    return buf.getvalue()


def _scatter_stages(ax, shown: list[Point], key: str, floor: float) -> None:
    """Each stage's networks in its colour; those below the range on its floor as ``v``."""
    for k, stage in enumerate(TITLES):
        mine = [p for p in shown if p.stage == stage]
        placed = [(getattr(p, key), *place(100 * p.accuracy, p.label, floor)[:2]) for p in mine]
        label = TITLES[stage]  # one legend entry per stage
        for marker in ("o", "v"):
            drawn = [(x, y) for x, y, m in placed if m == marker]
            if drawn:
                ax.scatter(*zip(*drawn), s=22, marker=marker, color=f"C{k}", alpha=0.75, label=label)
                label = None
