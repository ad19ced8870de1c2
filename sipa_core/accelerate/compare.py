"""The two exit losses compared (SIPA Figure 9): at the chosen position, the other loss's exit
is trained as well; the risk-coverage curve of each on test, their areas (AURC), and the
compared exit at the same validation target (its threshold the one sending most validation
images out)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sipa_core.accelerate.exits import LOSSES, risk_coverage
from sipa_core.accelerate.rule import most_exits, sweep, threshold_point
from sipa_core.accelerate.training import ExitTrainer, TrainedExit


@dataclass
class LossComparison:
    """The risk-coverage table (rows, columns) and the metrics of the comparison."""

    rows: list[dict] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, loss: str) -> LossComparison:
        return cls([], ["coverage", f"risk_{loss}"], {})


def compare_losses(trainer: ExitTrainer, chosen: TrainedExit, target: float) -> LossComparison:
    """Risk-coverage of the chosen exit; with ``compare_loss``, the other loss's exit trained at
    the same position too, and its figures at the same validation target."""
    cfg, reader = trainer.cfg, trainer.splits
    y_test = reader.labels("test")
    curves = {cfg["loss"]: risk_coverage(chosen.saved["test"], y_test)}
    metrics = {}
    if cfg["compare_loss"]:
        other = [name for name in LOSSES if name != cfg["loss"]][0]
        saved = trainer.train_exit(chosen.net.position, other)[1]
        curves[other] = risk_coverage(saved["test"], y_test)
        metrics.update(_at_target(trainer, saved, chosen.main_logits, target, other))
    for name, (_, aurc) in curves.items():
        metrics[f"aurc_{name}"] = aurc
    names = list(curves)
    rows = [{"coverage": cov, **{f"risk_{n}": curves[n][0][i][1] for n in names}}
            for i, (cov, _) in enumerate(curves[names[0]][0])]
    return LossComparison(rows, ["coverage"] + [f"risk_{n}" for n in names], metrics)


def _at_target(trainer: ExitTrainer, saved: dict, main_logits: dict, target: float, name: str) -> dict:
    """The compared loss's exit at the validation target: its threshold (the one sending most
    validation images out), and its test exit ratio and accuracy."""
    labels = {s: trainer.splits.labels(s) for s in ("val", "test")}
    best = most_exits(sweep({"val": saved["val"]}, main_logits, labels, trainer.cfg["thresholds"]), target)
    if best is None:
        return {f"{name}_threshold": None, f"{name}_exit_ratio": None, f"{name}_accuracy": None}
    at_test = threshold_point(saved, main_logits, labels, best.threshold)
    return {f"{name}_threshold": best.threshold, f"{name}_exit_ratio": at_test.exit_ratio,
            f"{name}_accuracy": at_test.accuracy}
