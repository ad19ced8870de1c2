"""The exit rule in its one home (sipa_core/accelerate/rule.py): the validation target, the
threshold sweep, the two choices, the decision to keep an exit or not, and the rule's record
that the quantize stage reads."""

from types import SimpleNamespace

import pytest
import torch

from sipa_core.accelerate.exits import ExitConfig
from sipa_core.accelerate.record import ExitRecord
from sipa_core.accelerate.rule import (ExitRule, MainNetwork, ThresholdPoint, choose, decide, most_exits, sweep,
                                       threshold_point)
from sipa_core.errors import SipaError


@pytest.mark.parametrize("min_accuracy, max_drop, main_val, target", [
    (None, 0.04, 0.70, 0.66),      # relative to the main network
    (0.68, None, 0.70, 0.68),      # absolute
    (0.60, 0.04, 0.70, 0.66),      # both: the higher one
    (0.69, 0.04, 0.70, 0.69),
    (None, None, 0.70, 0.0),       # neither: any threshold meets it
])
def test_target_is_the_higher_of_the_absolute_and_the_relative_bound(min_accuracy, max_drop, main_val, target):
    assert ExitRule((0.5,), min_accuracy, max_drop).target(main_val) == pytest.approx(target)


def test_the_rule_travels_in_the_exit_record_and_a_record_without_it_is_refused():
    rule = ExitRule.from_config({"thresholds": [0.3, 0.5], "min_accuracy": None, "max_drop": 0.1,
                                 "allow_no_exit": True})
    config = ExitConfig(0, 8, 4, 16, 3, "swish", 10)
    record = ExitRecord(config, {}, 0.5, 0.25, "softsmoothing", rule).as_dict()
    assert record["rule"] == {"thresholds": [0.3, 0.5], "min_accuracy": None, "max_drop": 0.1, "allow_no_exit": True}
    assert record["position"] == 0 and record["channels"] == 8  # stored flat, as plain data
    assert ExitRecord.from_dict(record, "acc.pt") == ExitRecord(config, {}, 0.5, 0.25, "softsmoothing", rule)
    with pytest.raises(SipaError, match=r"old\.pt: the exit record carries no complete threshold rule"):
        ExitRecord.from_dict({**record, "rule": None}, "old.pt")
    older = {**record, "rule": {k: v for k, v in record["rule"].items() if k != "allow_no_exit"}}
    with pytest.raises(SipaError, match=r"old\.pt: .*older accelerate stage"):  # before the rule was whole
        ExitRecord.from_dict(older, "old.pt")
    with pytest.raises(SipaError, match=r"old\.pt: malformed exit record \(no 'threshold'"):
        ExitRecord.from_dict({k: v for k, v in record.items() if k != "threshold"}, "old.pt")


def _logits():
    """Four validation images: exit confidences 0.9, 0.9, 0.8 (wrong), 0.6; the main network says 0."""
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    exit_logits = {"val": probs.log(), "test": probs.log()}
    main_logits = {"val": torch.tensor([[1.0, 0.0]] * 4), "test": torch.tensor([[1.0, 0.0]] * 4)}
    labels = {"val": torch.zeros(4, dtype=torch.long), "test": torch.zeros(4, dtype=torch.long)}
    return exit_logits, main_logits, labels


def test_a_threshold_point_is_the_thresholded_network_simulated_by_hand():
    exit_logits, main_logits, labels = _logits()
    cost = SimpleNamespace(summary=lambda ratio: {"ops": 100 * (1 - ratio), "score": 1 - ratio / 2})
    p = threshold_point(exit_logits, main_logits, labels, 0.7, cost, position=3)
    # > 0.7: images 0, 1 (right) and 2 (wrong) leave; image 3 goes on to the main network (right)
    assert (p.position, p.threshold, p.val_exit_ratio, p.val_accuracy) == (3, 0.7, 0.75, 0.75)
    assert (p.ops, p.score) == (pytest.approx(25.0), pytest.approx(0.625))  # the cost at the validation ratio
    assert (p.exit_ratio, p.accuracy) == (0.75, 0.75)
    val_only = threshold_point({"val": exit_logits["val"]}, main_logits, labels, 0.7)
    assert val_only.exit_ratio is None and val_only.accuracy is None and val_only.score is None


def test_choose_takes_the_lowest_score_and_most_exits_the_most_images_out():
    exit_logits, main_logits, labels = _logits()
    cost = SimpleNamespace(summary=lambda ratio: {"ops": 1 - ratio, "score": 1 - ratio})
    points = sweep(exit_logits, main_logits, labels, [0.5, 0.85, 0.95], cost)
    assert [(p.threshold, p.val_exit_ratio, p.val_accuracy) for p in points] == [
        (0.5, 1.0, 0.75), (0.85, 0.5, 1.0), (0.95, 0.0, 1.0)]
    assert choose(points, 0.75).threshold == 0.5        # every image out: the lowest score
    assert choose(points, 0.9).threshold == 0.85        # the target rules 0.5 out
    assert choose(points, 1.01) is None
    assert most_exits(points, 0.9).threshold == 0.85
    ties = [ThresholdPoint(0, 0.4, 0.5, 0.9, score=0.2), ThresholdPoint(0, 0.6, 0.5, 0.9, score=0.2)]
    assert most_exits(ties, 0.9).threshold == 0.4       # the first of equal ratios
    assert choose(ties, 0.9).threshold == 0.6           # equal score and accuracy: the higher threshold


@pytest.mark.parametrize("allow_no_exit, main_score, kept", [
    (True, 0.9, True),      # the exit's best point scores 0.5 < 0.9: kept
    (True, 0.5, False),     # it does not lower the score: the network passes through
    (False, 0.5, True),     # told to keep any exit that meets the target
])
def test_decide_keeps_an_exit_only_where_the_rule_says(allow_no_exit, main_score, kept):
    """One rule for both stages: the quantizing stage's re-calibration calls this same ``decide``
    with the rule recorded in the exit (``allow_no_exit`` included)."""
    exit_logits, main_logits, labels = _logits()
    cost = SimpleNamespace(summary=lambda ratio: {"ops": 1 - ratio, "score": 1 - ratio})
    points = sweep(exit_logits, main_logits, labels, [0.5, 0.85, 0.95], cost)
    rule = ExitRule((0.5, 0.85, 0.95), None, 0.0, allow_no_exit)
    decision = decide(points, rule, MainNetwork(1.0, 1.0, {"score": main_score}))
    assert decision.target == 1.0
    assert (decision.chosen is not None) == kept
    if kept:
        assert decision.chosen.threshold == 0.85 and decision.passthrough_reason is None
    else:
        assert "does not lower the score" in decision.passthrough_reason and decision.best_exit_score == 0.5
    strict = ExitRule((0.5, 0.85, 0.95), 1.01, None, allow_no_exit)
    assert decide(points, strict, MainNetwork(1.0, 1.0, {"score": 9.0})).passthrough_reason == \
        "no exit meets the validation accuracy target"
