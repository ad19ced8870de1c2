"""The exit rule: how an exit is kept and its threshold chosen on the validation split.

One home for it, used by both stages that choose: the accelerate stage applies
it when it chooses the exit and writes it into the exit record of its
checkpoint; the quantizing stage reads it from there (not from the
``accelerate`` params section) and applies it again, by ``decide`` too, to
the quantized network. The rule:

- the validation target is ``max(min_accuracy, main_val_accuracy - max_drop)``
  (either term left out when null);
- a threshold sweep simulates the thresholded network from cached logits at
  every candidate threshold;
- ``choose`` takes the point of lowest score that meets the target (ties:
  higher validation accuracy, then the higher threshold); ``most_exits`` the
  point sending most validation images out while meeting it (the compared
  loss's exit, for the risk-coverage claim);
- ``decide``: no point meets the target, or (``allow_no_exit``) the chosen
  point's score is not below the network's own without an exit: the network
  passes through without its exit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sipa_core.accelerate.exits import ExitCost, simulate
from sipa_core.errors import SipaError
from sipa_core.train.evaluation import accuracy


@dataclass(frozen=True)
class ExitRule:
    """Candidate thresholds and the validation accuracy target."""

    thresholds: tuple[float, ...]
    min_accuracy: float | None = None
    max_drop: float | None = None
    allow_no_exit: bool = True

    @classmethod
    def from_config(cls, cfg: dict) -> ExitRule:
        """The rule of an ``accelerate`` params section (checked)."""
        return cls(tuple(cfg["thresholds"]), cfg["min_accuracy"], cfg["max_drop"], cfg["allow_no_exit"])

    @classmethod
    def from_dict(cls, rule, path) -> ExitRule:
        """The rule an exit record carries; one written before the rule was whole is refused."""
        if not isinstance(rule, dict) or not rule.get("thresholds") or not isinstance(rule.get("allow_no_exit"), bool):
            raise SipaError(f"{path}: the exit record carries no complete threshold rule (written by an older "
                            f"accelerate stage); run the accelerate stage again")
        return cls(tuple(rule["thresholds"]), rule.get("min_accuracy"), rule.get("max_drop"), rule["allow_no_exit"])

    def as_record(self) -> dict:
        return {**asdict(self), "thresholds": list(self.thresholds)}

    def target(self, main_val_accuracy: float) -> float:
        """The validation accuracy the thresholded network must reach."""
        floor = self.min_accuracy if self.min_accuracy is not None else 0.0
        relative = main_val_accuracy - self.max_drop if self.max_drop is not None else 0.0
        return max(floor, relative)


@dataclass(frozen=True)
class ThresholdPoint:
    """The thresholded network at one (position, threshold): validation figures, the score at the
    validation exit ratio, and the test figures where the test logits were given."""

    position: int | None
    threshold: float
    val_exit_ratio: float
    val_accuracy: float
    ops: float | None = None
    score: float | None = None
    exit_ratio: float | None = None
    accuracy: float | None = None
    score_tree: float | None = None  # the score with the adder-tree accounting (scoring.md)


def threshold_point(exit_logits: dict, main_logits: dict, labels: dict, threshold: float,
                    cost: ExitCost | None = None, position: int | None = None) -> ThresholdPoint:
    """Simulate ``threshold`` on the validation split (and the test split when its logits are given)."""
    vpred, vexit = simulate(exit_logits["val"], main_logits["val"], threshold)
    val_ratio = float(vexit.float().mean())
    counted = cost.summary(val_ratio) if cost is not None else {}
    test = {}
    if "test" in exit_logits:
        tpred, texit = simulate(exit_logits["test"], main_logits["test"], threshold)
        test = {"exit_ratio": float(texit.float().mean()), "accuracy": accuracy(tpred, labels["test"])}
    return ThresholdPoint(position, threshold, val_ratio, accuracy(vpred, labels["val"]),
                          counted.get("ops"), counted.get("score"), **test, score_tree=counted.get("score_tree"))


def sweep(exit_logits: dict, main_logits: dict, labels: dict, thresholds, cost: ExitCost | None = None,
          position: int | None = None) -> list[ThresholdPoint]:
    """One point per threshold, in the order given."""
    return [threshold_point(exit_logits, main_logits, labels, t, cost, position) for t in thresholds]


def choose(points: list[ThresholdPoint], target: float) -> ThresholdPoint | None:
    """The lowest-score point whose validation accuracy meets ``target``
    (ties: higher validation accuracy, then the higher threshold)."""
    ok = [p for p in points if p.val_accuracy >= target - 1e-12]
    return min(ok, key=lambda p: (p.score, -p.val_accuracy, -p.threshold)) if ok else None


def most_exits(points: list[ThresholdPoint], target: float) -> ThresholdPoint | None:
    """The point sending most validation images out while meeting ``target`` (ties: the first)."""
    best = None
    for p in points:
        if p.val_accuracy >= target - 1e-12 and (best is None or p.val_exit_ratio > best.val_exit_ratio):
            best = p
    return best


@dataclass(frozen=True)
class MainNetwork:
    """The network without its exit, as the exit is judged against it: validation and test
    accuracy and its MicroNet keys."""

    val_accuracy: float
    test_accuracy: float
    score: dict


@dataclass(frozen=True)
class ExitDecision:
    """What the rule chose on validation: a point, or none and why."""

    chosen: ThresholdPoint | None
    target: float
    passthrough_reason: str | None = None
    best_exit_score: float | None = None

    def metrics(self) -> dict:
        out = {"val_target": self.target}
        if self.passthrough_reason is not None:
            out["passthrough_reason"] = self.passthrough_reason
        if self.best_exit_score is not None:
            out["best_exit_score"] = self.best_exit_score
        return out


def decide(candidates: list[ThresholdPoint], rule: ExitRule, main: MainNetwork) -> ExitDecision:
    """The chosen candidate on validation, or none (with the reason) when the network passes through."""
    target = rule.target(main.val_accuracy)
    chosen = choose(candidates, target)
    if chosen is None:
        return ExitDecision(None, target, "no exit meets the validation accuracy target")
    if rule.allow_no_exit and chosen.score >= main.score["score"]:
        return ExitDecision(None, target, f"the best exit (score {chosen.score:.6f}) does not lower the score",
                            chosen.score)
    return ExitDecision(chosen, target)
