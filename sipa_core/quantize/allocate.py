"""Per-layer widths under a budget (``quantize.layer_widths: allocated``).

Each conv and linear layer gets one width for its weights and its input, from
``width_choices`` (e.g. 8, 6, 4):

1. **Sensitivity**, on validation data only: the float input network with that one layer
   quantized at that width (the stage's quantizers, calibrated on training batches, no training),
   its validation accuracy below the float network's is the layer's drop at that width.
2. **Cost**, exact: the counter's per-layer parameter bytes and math ops of the network counted
   with every layer at that width (a layer's cost does not depend on the other layers' widths),
   normalised as the score normalises them; what is not allocated (elementwise operations,
   BatchNorm-folded biases) is a constant.
3. **Allocation**, a multiple-choice knapsack solved exactly as an integer program
   (``scipy.optimize.milp``): with ``budget``, the least summed drop whose score is at most the
   budget; with ``max_drop``, the lowest score whose summed drop is at most ``max_drop``. Summed
   single-layer drops are the usual additive model of quantization sensitivity (HAWQ-V3 uses the
   same integer program); a greedy pass is not optimal for a multiple-choice knapsack, and the
   exact program takes milliseconds at this size.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sipa_core.errors import SipaError
from sipa_core.io import atomic_write_json
from sipa_core.quantize.qat import calibrate, fold_batchnorm, quantize_modules
from sipa_core.quantize.quantizers import Quantizers, quantization_targets
from sipa_core.quantize.training import QuantRun
from sipa_core.resume import run_key
from sipa_core.scoring import REFERENCE_BYTES, REFERENCE_OPS, BitWidths, count
from sipa_core.train.evaluation import normalized

FLOAT = 16  # the width of the layers not under test: floating point
ALLOCATION_COLUMNS = ["layer", "bits", "val_drop", "score"]


@dataclass(frozen=True)
class Allocation:
    """The chosen width per layer, and what it was chosen from."""

    widths: dict[str, int]  # layer -> bits (weights and input)
    drops: dict[tuple[str, int], float]  # (layer, bits) -> validation accuracy drop alone
    costs: dict[tuple[str, int], float]  # (layer, bits) -> score of the layer
    fixed: float  # the score of what is not allocated
    predicted_drop: float
    predicted_score: float

    def rows(self) -> list[dict]:
        return [{"layer": n, "bits": b, "val_drop": self.drops[(n, b)], "score": self.costs[(n, b)]}
                for n, b in self.widths.items()]


def layer_costs(model: nn.Module, input_shape, choices, widths: BitWidths) -> tuple[dict, float]:
    """(layer, bits) -> the layer's score at that width, and the score of the rest (constant)."""
    folded = copy.deepcopy(model).cpu().eval()
    fold_batchnorm(folded)  # as the quantized network is stored and counted
    layers = [n for n, _ in quantization_targets(folded)]
    costs, fixed = {}, None
    for bits in choices:
        result = count(folded, input_shape, bits=BitWidths(bits, bits, widths.add, (), widths.elementwise,
                                                           widths.unsigned))
        table = {r["module"]: r for r in result.layer_table()}
        for n in layers:
            row = table.get(n, {"params_bytes": 0.0, "total_ops": 0.0})
            costs[(n, bits)] = row["params_bytes"] / REFERENCE_BYTES + row["total_ops"] / REFERENCE_OPS
        if fixed is None:  # the rest is counted alike at every width: the first width's will do
            fixed = result.summary()["score"] - sum(costs[(n, bits)] for n in layers)
    return costs, fixed


@torch.no_grad()
def _accuracy(model: nn.Module, batches) -> float:
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return hits / max(1, sum(len(y) for _, y in batches))


def layer_drops(model: nn.Module, choices, widths: BitWidths, quantizers: Quantizers, calibration,
                validation) -> dict[tuple[str, int], float]:
    """(layer, bits) -> validation accuracy of the float network minus that of the network with only
    that layer quantized at ``bits`` (``validation``: (images, labels) batches, never test)."""
    base = copy.deepcopy(model).cpu().eval()
    fold_batchnorm(base)
    reference = _accuracy(base, validation)
    drops = {}
    for name, _ in quantization_targets(base):
        for bits in choices:
            one = copy.deepcopy(base)
            quantize_modules(one, BitWidths(FLOAT, FLOAT, widths.add, ((name, bits, bits),), widths.elementwise,
                                            widths.unsigned), quantizers)
            calibrate(one, calibration)
            drops[(name, bits)] = reference - _accuracy(one, validation)
    return drops


def allocate(drops: dict, costs: dict, fixed: float, *, budget: float | None = None,
             max_drop: float | None = None) -> Allocation:
    """The exact integer program over one width per layer (see the module's doc)."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # noqa: PLC0415 (only here)

    keys = list(costs)
    layers = list(dict.fromkeys(n for n, _ in keys))  # in the network's order
    d = np.array([drops[k] for k in keys])
    c = np.array([costs[k] for k in keys])
    one_each = np.array([[1.0 if k[0] == n else 0.0 for k in keys] for n in layers])
    rows = [LinearConstraint(one_each, 1, 1)]
    if budget is not None:
        objective, rows = d, rows + [LinearConstraint(c[None, :], -np.inf, budget - fixed)]
    else:
        objective, rows = c, rows + [LinearConstraint(d[None, :], -np.inf, max_drop)]
    res = milp(objective, constraints=rows, integrality=np.ones(len(keys)), bounds=Bounds(0, 1))
    if res.x is None:
        cheapest = fixed + sum(min(costs[k] for k in keys if k[0] == n) for n in layers)
        raise SipaError(f"quantize.budget: {budget} is below the cheapest allocation ({cheapest:.6f}, every "
                        f"layer at its narrowest width)" if budget is not None else
                        f"quantize.max_drop: {max_drop} cannot be met: no allocation's summed drop is that small")
    chosen = {k[0]: k[1] for k, x in zip(keys, res.x) if x > 0.5}
    widths = {n: chosen[n] for n in layers}
    return Allocation(widths, drops, costs, fixed, float(sum(drops[(n, b)] for n, b in widths.items())),
                      fixed + float(sum(costs[(n, b)] for n, b in widths.items())))


def _measured_drops(run: QuantRun, widths: BitWidths) -> dict:
    """Each layer's validation drop at each width, kept in the state folder so that a resumed run
    does not measure them again."""
    cfg, data = run.cfg, run.data
    saved = Path(cfg["state"]) / f"drops-{run_key({**run.key, 'choices': cfg['width_choices']})}.json"
    if saved.is_file():
        return {(n, int(b)): d for n, b, d in json.loads(saved.read_text())}
    x, y = data.split("val")
    bs = run.recipe["eval_batch_size"]
    validation = [(normalized(x[i:i + bs], data.mean, data.std), y[i:i + bs]) for i in range(0, len(y), bs)]
    drops = layer_drops(run.main, cfg["width_choices"], widths, run.quantizers, run.batches(), validation)
    atomic_write_json(saved, [[n, b, d] for (n, b), d in drops.items()])
    return drops


def allocate_widths(run: QuantRun) -> Allocation:
    """Each layer's width under ``budget`` or ``max_drop``: drops on validation, exact costs, the
    integer program. An infeasible budget is said before any drop is measured."""
    cfg = run.cfg
    if not len(run.data.val_y):
        raise SipaError(f"{run.params_file}: quantize.layer_widths: allocated measures each layer on the "
                        f"validation split, but it is empty (prepare.val_size: 0)")
    widths = replace(cfg["widths"], unsigned=run.quantizers.unsigned())
    costs, fixed = layer_costs(run.main, (3, *run.data.image_size), cfg["width_choices"], widths)
    try:
        if cfg["budget"] is not None:  # infeasible whatever the drops: said before measuring them
            allocate({k: 0.0 for k in costs}, costs, fixed, budget=cfg["budget"])
        return allocate(_measured_drops(run, widths), costs, fixed, budget=cfg["budget"], max_drop=cfg["max_drop"])
    except SipaError as err:
        raise SipaError(f"{run.params_file}: {err}") from None


def allocation_metrics(allocation: Allocation | None) -> dict:
    if allocation is None:
        return {}
    return {"allocated_widths": allocation.widths, "allocation_predicted_drop": allocation.predicted_drop,
            "allocation_predicted_score": allocation.predicted_score}
