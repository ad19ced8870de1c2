"""Gradual pruning in one training run (Zhu and Gupta, 2017): the sparsity rises
from s_i to s_f over the pruning steps as

    s_t = s_f + (s_i - s_f) (1 - t / T)^3,

the masks recomputed by magnitude every ``every`` optimizer steps (cumulative:
a weight removed stays removed), then held at s_f for the fine-tune epochs.
A choice beside the paper's rounds (``prune.method: gradual``), with the same
scope and normalisation.
"""

from __future__ import annotations

from torch import nn

from sipa_core.prune.masks import apply_masks, magnitude_masks, masks_from_zeros


def zhu_gupta(t: int, total: int, initial: float, final: float) -> float:
    """The sparsity at step ``t`` of ``total`` pruning steps (``final`` from ``total`` on)."""
    if total <= 0 or t >= total:
        return final
    return final + (initial - final) * (1 - t / total) ** 3


class GradualPruner:
    """The engine's ``after_step`` hook: prune on the schedule, keep the masks applied.

    ``begin(model, step, steps_per_epoch)`` is called by the engine before training (after a
    resume, ``step`` is where the run continues and the model holds the saved weights, whose
    zeros are the masks); ``pruning_epochs`` of the fit's epochs raise the sparsity, the rest
    fine-tune at ``final``."""

    def __init__(self, initial: float, final: float, pruning_epochs: int, every: int, scope: str, normalize: str,
                 costs=None):
        self.initial, self.final, self.pruning_epochs, self.every = initial, final, pruning_epochs, every
        self.scope, self.normalize, self.costs = scope, normalize, costs  # costs: normalize score
        self.step, self.total, self.masks = 0, 0, None

    def begin(self, model: nn.Module, step: int, steps_per_epoch: int) -> None:
        # The masks come from the weights before any optimizer step moves a pruned one.
        self.step, self.total, self.masks = step, self.pruning_epochs * steps_per_epoch, masks_from_zeros(model)

    def target(self) -> float:
        return zhu_gupta(self.step, self.total, self.initial, self.final)

    def __call__(self, model: nn.Module) -> None:
        self.step += 1
        if self.step % self.every == 0 or self.step == self.total:
            if self.step <= self.total:
                self.masks = magnitude_masks(model, self.masks, self.target(), scope=self.scope,
                                             normalize=self.normalize, costs=self.costs)
        apply_masks(model, self.masks)
