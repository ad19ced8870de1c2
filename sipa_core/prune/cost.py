"""What one weight costs in the MicroNet score, per tensor, from the counter: score-aware pruning
(``normalize: score``) and score targets (``target: score``).

A nonzero weight of a tensor stored sparse costs its value's bits (``params``, as the score
normalises parameter bytes) and its multiply-adds per example (``ops``: one multiplication at the
layer's width and one addition at the strict accounting's 32 bits per output position, as the
score normalises math ops); a stem weight at 32 px is used at every output position, a
classifier weight once. A tensor is stored sparse only below density
1 - 1/bits (the counter's choice: values plus a 1-bit mask, where that is cheaper), so a tensor
pruned less than that saves nothing at all (``dead_zone``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from sipa_core.errors import SipaError
from sipa_core.prune.masks import apply_masks, prunable
from sipa_core.scoring import REFERENCE_BYTES, REFERENCE_OPS, count


@dataclass(frozen=True)
class WeightCost:
    """The score one nonzero weight of a tensor costs when the tensor is stored sparse."""

    params: float
    ops: float
    bits: int

    @property
    def total(self) -> float:
        return self.params + self.ops

    def dead_zone(self, density: float) -> bool:
        """Pruned, but not enough for sparse storage: stored and multiplied dense, nothing saved."""
        return 1 - 1 / self.bits <= density < 1


def weight_costs(model: nn.Module, input_shape, bits) -> dict[str, WeightCost]:
    """Each prunable tensor's ``WeightCost`` (``bits``: an int or a ``BitWidths``)."""
    dense = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        for p in prunable(dense).values():
            p.fill_(1.0)  # every weight nonzero: the dense count, per weight
    result = count(dense, input_shape, bits=bits)
    names = set(prunable(dense))
    add_bits = result.widths.add if isinstance(result.widths.add, int) else 32  # the strict score's
    ops: dict[str, float] = {}
    for o in result.ops_list:  # a weight's uses per example: one multiply and one addition each
        name = f"{o.module}.weight"
        if o.accumulation and name in names:
            ops[name] = ops.get(name, 0.0) + o.mults * (o.mul_bits + add_bits) / 32
    costs = {}
    for name, p in prunable(dense).items():
        w_bits = result.widths.param_bits(name.rpartition(".")[0])
        costs[name] = WeightCost(w_bits / 8 / REFERENCE_BYTES, ops.get(name, 0.0) / p.numel() / REFERENCE_OPS,
                                 w_bits)
    return costs


def counted_score(model: nn.Module, masks: dict[str, torch.Tensor], input_shape, bits) -> float:
    """The strict score of ``model`` with ``masks`` applied (on a copy)."""
    pruned = copy.deepcopy(model).cpu().eval()
    apply_masks(pruned, {k: v.cpu() for k, v in masks.items()})
    return count(pruned, input_shape, bits=bits).summary()["score"]


def masks_for_score(make_masks, model: nn.Module, target: float, start: float, input_shape, bits,
                    steps: int = 18) -> tuple[dict, float]:
    """The least sparsity (at least ``start``) whose masks (``make_masks(sparsity)``) bring the
    counted score to ``target`` or below, by bisection; (masks, sparsity)."""
    low, high = start, 0.999
    best = make_masks(high)
    if counted_score(model, best, input_shape, bits) > target:
        raise SipaError(f"prune.schedule: score {target} cannot be reached by pruning weights (at 99.9% "
                        f"sparsity the network still scores more)")
    for _ in range(steps):
        mid = (low + high) / 2
        masks = make_masks(mid)
        if counted_score(model, masks, input_shape, bits) <= target:
            high, best = mid, masks
        else:
            low = mid
    return best, high
