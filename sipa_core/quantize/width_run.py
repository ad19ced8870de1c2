"""One set of widths, end to end: the quantized network trained (``training.py``), counted by the
MicroNet rules on its quantized values, and, with an exit, the exit kept or dropped and its
threshold chosen again on validation by the exit rule the accelerate stage recorded
(``accelerate/rule.py``: the same ``decide``, against this network's own validation accuracy
and score).

The score is counted on the quantized values: each layer's weights at their width,
multiplications at the wider of weight and activation width, elementwise products
(activation functions, SE gate, pooling) at 16 bits because they are not quantized here,
additions at ``add_bits``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sipa_core.accelerate.exits import EarlyExitNetwork, ExitCost, exit_cost, simulate
from sipa_core.accelerate.rule import ExitDecision, MainNetwork, decide, sweep
from sipa_core.quantize.qat import float_twin
from sipa_core.quantize.training import QuantRun, train_exit, train_main
from sipa_core.resume import run_key
from sipa_core.scoring import count
from sipa_core.scoring.bits import BitWidths
from sipa_core.train.evaluation import accuracy

SPLITS = ("val", "test")


@dataclass(frozen=True)
class Figures:
    """A network's figures: validation and test accuracy, its counted cost, its test predictions."""

    val_accuracy: float | None
    accuracy: float
    summary: dict
    test_predictions: torch.Tensor


@dataclass(frozen=True)
class KeptExit:
    """The exit kept on the quantized network: the network with it, its threshold and exit ratios,
    and the thresholded network's figures (its cost at the test exit ratio)."""

    net: EarlyExitNetwork
    threshold: float
    exit_ratio: float
    val_exit_ratio: float
    figures: Figures


@dataclass(frozen=True)
class WidthResult:
    """One width's quantized main network and its figures; with an exit, the rule's decision and
    the kept exit (None when the rule dropped it)."""

    widths: BitWidths
    main: torch.nn.Module
    main_figures: Figures
    decision: ExitDecision | None = None
    kept: KeptExit | None = None

    @property
    def final(self) -> Figures:
        """The figures of what the stage hands on: the thresholded network, or the main network."""
        return self.kept.figures if self.kept is not None else self.main_figures


def counted(run: QuantRun, main, net, widths: BitWidths) -> tuple[dict, ExitCost | None]:
    """The MicroNet cost of the quantized values: (main network's summary, ExitCost or None)."""
    h = run.data.image_size[0]
    plain = float_twin(main)
    summary = count(plain, (3, h, h), bits=widths).summary()
    if net is None:
        return summary, None
    twin = EarlyExitNetwork(plain, net.exit_cfg, float_twin(net.exit))
    return summary, exit_cost(twin, (3, h, h), bits=widths, exit_bits=run.exit_widths(widths))


def _run_dir(run: QuantRun, widths: BitWidths) -> Path:
    key = run_key({**run.key, "widths": widths.as_dict()})
    label = widths.label().replace(" ", "")
    if len(label) > 80:  # allocated: a width per layer; the key tells the runs apart
        label = f"W{widths.weight}A{widths.act}({len(widths.overrides)}layers)"
    return Path(run.cfg["state"]) / f"{label}-{key}"


def quantize_at(run: QuantRun, widths: BitWidths) -> WidthResult:
    """Quantize, train and count at ``widths``; with an exit, decide on it again on validation."""
    widths = replace(widths, unsigned=run.quantizers.unsigned())  # counted as the quantizers run
    run_dir = _run_dir(run, widths)
    main = train_main(run, widths, run_dir)
    net = train_exit(run, main, widths, run_dir) if run.exit_record is not None else None
    logits = {"main": {s: run.splits.logits(main, s, fp16=True) for s in SPLITS}}
    main_summary, cost = counted(run, main, net, widths)
    labels = {s: run.splits.labels(s) for s in SPLITS}
    val = accuracy(logits["main"]["val"], labels["val"]) if len(labels["val"]) else None
    figures = Figures(val, accuracy(logits["main"]["test"], labels["test"]), main_summary,
                      logits["main"]["test"].argmax(1))
    if net is None:
        return WidthResult(widths, main, figures)
    logits["exit"] = {s: run.splits.logits(net, s, fp16=True) for s in SPLITS}
    points = sweep({"val": logits["exit"]["val"]}, logits["main"], {"val": labels["val"]},
                   run.exit_record.rule.thresholds, cost)
    decision = decide(points, run.exit_record.rule, MainNetwork(val, figures.accuracy, main_summary))
    if decision.chosen is None:
        return WidthResult(widths, main, figures, decision)
    chosen = decision.chosen
    tpred, texit = simulate(logits["exit"]["test"], logits["main"]["test"], chosen.threshold)
    ratio = float(texit.float().mean())
    kept = KeptExit(net, chosen.threshold, ratio, chosen.val_exit_ratio,
                    Figures(chosen.val_accuracy, accuracy(tpred, labels["test"]), cost.summary(ratio), tpred))
    return WidthResult(widths, main, figures, decision, kept)
