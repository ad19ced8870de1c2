"""Pruning primitives (SIPA section 2.3): magnitude masks and filter removal.

Two granularities:

* ``weight``: unstructured masks over every weight tensor of more than one
  dimension (stem, expand, depthwise, SE, project, head, classifier). The
  scope is ``global`` (one threshold over all tensors, optionally after the
  paper's layer-wise L2 normalisation, and with ``score`` that normalised
  magnitude per unit of counted score: ``cost.py``) or ``layerwise`` (every
  tensor at the same sparsity). Masks are boolean tensors keyed by parameter name; pruned
  weights are kept exactly zero by re-applying the masks after every
  optimizer step.
* ``filter``: whole output channels are removed with torch-pruning, which
  follows the dependencies of an MBConv block (expand -> depthwise -> SE ->
  project, and residual chains), so the network really gets smaller. The
  resulting channel counts go into the architecture spec, so a checkpoint
  rebuilds the smaller network.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from sipa_core.errors import SipaError
from sipa_core.models import create_model
from sipa_core.models.sources import SOURCE_FAMILIES, resized_layers

SCOPES = ("global", "layerwise")
NORMALIZATIONS = ("none", "l2", "score")
GRANULARITIES = ("weight", "filter")


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every weight tensor of more than one dimension; biases and BatchNorm are never pruned."""
    return {name: p for name, p in model.named_parameters() if p.dim() > 1}


def full_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in prunable(model).items()}


def masks_from_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks that keep what is nonzero now (a pruned checkpoint's own masks)."""
    return {name: p.detach() != 0 for name, p in prunable(model).items()}


def scores(model: nn.Module, masks: dict[str, torch.Tensor], normalize: str, costs=None) -> dict[str, torch.Tensor]:
    """|w| times the current mask; with ``l2``, divided by that masked tensor's L2 norm; with
    ``score``, that divided again by what one of its weights costs in the score (``costs``:
    name -> ``cost.WeightCost``), so one threshold removes what buys least accuracy per score.

    The layer-wise normalisation puts every layer on the same scale before a
    global threshold, so small layers (depthwise, SE) are not emptied first.
    """
    if normalize == "score" and costs is None:
        raise SipaError("normalize: score needs each tensor's weight cost (prune.cost.weight_costs)")
    out = {}
    for name, p in prunable(model).items():
        s = p.detach().abs().float() * masks[name]
        if normalize in ("l2", "score"):
            norm = s.norm(p=2)
            s = s / norm if norm > 0 else s
        if normalize == "score":
            s = s / costs[name].total
        out[name] = s
    return out


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest values (stable: ties broken by position)."""
    return torch.argsort(values, stable=True)[:k]


def magnitude_masks(model: nn.Module, masks: dict[str, torch.Tensor], target: float, *, scope: str = "global",
                    normalize: str = "l2", costs=None) -> dict[str, torch.Tensor]:
    """New masks with a fraction ``target`` of the prunable weights removed.

    Cumulative: weights already masked score 0 and are the first to go, so a
    round never revives what an earlier round removed. With ``normalize: score``,
    a tensor the threshold would prune too little for sparse storage (it would save
    nothing) is left as it is and the threshold found again without it.
    """
    if not 0 <= target < 1:
        raise SipaError(f"sparsity target must be in [0, 1), got {target}")
    sc = scores(model, masks, normalize if scope == "global" else "none", costs)
    if scope == "global" and normalize == "score":
        return _score_aware(sc, masks, target, costs)
    new = {}
    if scope == "layerwise":
        for name, s in sc.items():
            flat = s.flatten()
            keep = torch.ones_like(flat, dtype=torch.bool)
            keep[_smallest(flat, round(target * flat.numel()))] = False
            new[name] = keep.view_as(s)
        return new
    if scope != "global":
        raise SipaError(f"unknown pruning scope {scope!r}; known: {', '.join(SCOPES)}")
    return _global_threshold(sc, target)


def _global_threshold(sc: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
    """One threshold over every tensor's scores: the ``target`` fraction of smallest scores removed."""
    names = list(sc)
    flat = torch.cat([sc[n].flatten() for n in names])
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[_smallest(flat, round(target * flat.numel()))] = False
    new, offset = {}, 0
    for n in names:
        size = sc[n].numel()
        new[n] = keep[offset:offset + size].view_as(sc[n])
        offset += size
    return new


def _score_aware(sc: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], target: float, costs) -> dict:
    """One threshold over cost-normalised scores; tensors left in the dead zone are kept as they are
    (what earlier rounds removed stays removed) and the threshold is found again."""
    sc, kept = dict(sc), set()
    while True:
        new = _global_threshold(sc, target)
        dead = [n for n, m in new.items() if n not in kept and costs[n].dead_zone(float(m.float().mean()))]
        if not dead:
            return new
        kept.update(dead)
        for n in dead:  # not pruned further: its kept weights rank last, what it lost stays lost
            sc[n] = torch.where(masks[n], torch.full_like(sc[n], float("inf")), torch.zeros_like(sc[n]))


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked weights in place (after every optimizer step, and at load)."""
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        p = params[name]
        p.mul_(keep.to(device=p.device, dtype=p.dtype))


def sparsity(model: nn.Module) -> float:
    """Fraction of the prunable weights that are zero."""
    ps = list(prunable(model).values())
    total = sum(p.numel() for p in ps)
    return sum(int((p == 0).sum()) for p in ps) / total if total else 0.0


def layer_table(model: nn.Module) -> list[dict]:
    """Per prunable tensor: its size, nonzeros and sparsity."""
    rows = []
    for name, p in prunable(model).items():
        nz = int(torch.count_nonzero(p))
        rows.append({"layer": name, "shape": "x".join(map(str, p.shape)), "numel": p.numel(), "nonzero": nz,
                     "sparsity": 1 - nz / p.numel()})
    return rows


# ---------------------------------------------------------------- filters


def _channel_count(model: nn.Module, ignored: list[nn.Module]) -> int:
    skip = {id(m) for m in ignored}
    return sum(m.out_channels for m in model.modules()
               if isinstance(m, nn.Conv2d) and id(m) not in skip)


@torch.no_grad()
def _zero_dep(module: nn.Module, handler: str, idxs: list[int]) -> None:
    """Zero, in a same-shaped network, what removing channels ``idxs`` removes."""
    idx = torch.as_tensor(idxs, dtype=torch.long)
    out = handler.endswith("out_channels")
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        if out or (isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1):
            module.weight[idx] = 0
            if module.bias is not None:
                module.bias[idx] = 0
        else:
            module.weight[:, idx] = 0
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.weight[idx] = 0
        module.bias[idx] = 0


def remove_filters(model: nn.Module, ratio: float, example: torch.Tensor, *, scope: str = "global",
                   normalize: str = "l2", mirror: nn.Module | None = None, round_to: int | None = None) -> int:
    """Remove a fraction ``ratio`` of the current output channels (by L2 norm), in place.

    Channels are removed in dependency groups, so every layer that reads a
    removed channel loses its input slice too. The classifier's outputs (the
    classes) are never removed. ``mirror``, a same-shaped copy, gets the same
    channels zeroed instead of removed (weights and BatchNorm affine): the
    masked network whose outputs the smaller one must equal. ``round_to``:
    each layer keeps a multiple of that many channels (torch-pruning's
    rounding; integer kernels run channel blocks of 8 or 16). Returns the
    number of channels removed.
    """
    if not 0 <= ratio < 1:
        raise SipaError(f"filter pruning ratio must be in [0, 1), got {ratio}")
    if scope not in SCOPES:
        raise SipaError(f"unknown pruning scope {scope!r}; known: {', '.join(SCOPES)}")
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    before = _channel_count(model, classifier)
    if ratio == 0:
        return 0
    normalizer = None
    if normalize == "l2":
        def normalizer(imp):  # the paper's layer-wise normalisation, per dependency group
            norm = imp.norm(p=2)
            return imp / norm if norm > 0 else imp
    importance = tp.importance.MagnitudeImportance(p=2, group_reduction="mean", normalizer=normalizer)
    was_training = model.training
    model.eval()
    pruner = tp.pruner.MetaPruner(model, example, importance=importance, global_pruning=scope == "global",
                                  pruning_ratio=ratio, max_pruning_ratio=0.9, ignored_layers=classifier,
                                  round_to=round_to)
    names = {id(m): n for n, m in model.named_modules()}
    mirror_modules = dict(mirror.named_modules()) if mirror is not None else {}
    for group in pruner.step(interactive=True):
        if mirror is not None:
            for dep, idxs in group:
                module = dep.target.module
                if id(module) in names and len(idxs):
                    handler = getattr(dep.handler, "__name__", type(dep.handler).__name__)
                    _zero_dep(mirror_modules[names[id(module)]], handler, list(idxs))
        group.prune()
    model.train(was_training)
    return before - _channel_count(model, classifier)


def records_filters(model: nn.Module) -> bool:
    """Whether a filter-pruned ``model`` can be recorded so that a checkpoint rebuilds it."""
    return hasattr(model, "channel_counts") or model.spec.get("family") in SOURCE_FAMILIES


def refresh_spec(model: nn.Module) -> dict:
    """Record a filter-pruned network's channel counts in its spec (so checkpoints rebuild it): an
    EfficientNet's per block, any other network's as its resized layers (``models.sources``)."""
    if not records_filters(model):
        raise SipaError(f"filter pruning: the {model.spec.get('family')} family records no channel counts")
    if not hasattr(model, "channel_counts"):
        fresh = create_model({k: v for k, v in model.spec.items() if k != "resized"})
        model.spec = {**model.spec, "resized": resized_layers(model, fresh)}
        return model.spec
    model.spec = {**model.spec, "channels": model.channel_counts() or None}
    if model.spec["channels"] is None:
        model.spec.pop("channels")
    return model.spec
