"""Recipe changes to the network itself: activation swap, dropout,
drop-connect (through the architecture spec, so checkpoints rebuild the
same network) and ghost BatchNorm (a drop-in BatchNorm2d subclass)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sipa_core.errors import SipaError
from sipa_core.models.layers import swap_activations


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from virtual batches.

    In training, a batch is split into chunks of ``virtual_batch`` images and
    each chunk is normalised with its own mean and variance (the running
    statistics are updated once per chunk). In evaluation it is a plain
    BatchNorm2d, and its state dict is the same, so checkpoints move freely
    between the two.
    """

    def __init__(self, num_features, virtual_batch: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.virtual_batch = virtual_batch

    def forward(self, x):
        if not self.training or x.shape[0] <= self.virtual_batch:
            return super().forward(x)
        chunks = x.split(self.virtual_batch)
        return torch.cat([F.batch_norm(c, self.running_mean, self.running_var, self.weight, self.bias, True,
                                       self.momentum, self.eps) for c in chunks])


def apply_ghost_bn(model: nn.Module, virtual_batch: int) -> int:
    """Replace every BatchNorm2d by a GhostBatchNorm2d holding the same tensors."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                ghost = GhostBatchNorm2d(child.num_features, virtual_batch, eps=child.eps, momentum=child.momentum,
                                         affine=child.affine, track_running_stats=child.track_running_stats)
                ghost.load_state_dict(child.state_dict())
                ghost.to(next(child.buffers()).device)
                setattr(parent, name, ghost)
                replaced += 1
    return replaced


STRUCTURAL_KEYS = ("activation", "dropout", "drop_connect")  # recipe keys that change the network itself


def unsupported_structure(spec: dict, recipe: dict) -> list[str]:
    """The recipe's structural keys that the network's spec cannot record (its family has no such
    setting): training them would hand the next stage a network rebuilt without them."""
    return [k for k in STRUCTURAL_KEYS if recipe.get(k) is not None and k not in spec]


def spec_with_recipe(spec: dict, recipe: dict) -> dict:
    """The architecture spec with the recipe's activation/dropout/drop-connect; a key the spec has
    no place for is an error (it would be lost when the next stage rebuilds the network)."""
    missing = unsupported_structure(spec, recipe)
    if missing:
        name = spec.get("name") or spec.get("family")
        raise SipaError(f"{missing[0]}: the network {name} has no {missing[0]} setting, so a checkpoint could not "
                        f"rebuild it as trained")
    spec = dict(spec)
    for key in STRUCTURAL_KEYS:
        if recipe.get(key) is not None:
            spec[key] = recipe[key]
    return spec


def configure_model(model: nn.Module, recipe: dict) -> nn.Module:
    """Apply the recipe's structural settings to a built model, in place.

    Spec-level settings (activation, dropout, drop-connect) are applied to
    the modules and recorded in ``model.spec`` so a checkpoint rebuilds the
    same network; ghost BatchNorm is a training-time change only.
    """
    spec = getattr(model, "spec", None)
    if spec is not None:
        model.spec = spec_with_recipe(spec, recipe)  # first: a setting the network cannot record fails here
    if recipe.get("activation"):
        swap_activations(model, recipe["activation"])
    if recipe.get("dropout") is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = recipe["dropout"]
    if recipe.get("drop_connect") is not None and hasattr(model, "blocks"):
        n = len(model.blocks)
        for i, block in enumerate(model.blocks):
            if hasattr(block, "drop_rate"):
                block.drop_rate = recipe["drop_connect"] * i / n
    if recipe.get("ghost_batch"):
        apply_ghost_bn(model, recipe["ghost_batch"])
    return model
