"""The optimizer side of a recipe: SGD parameter groups and the per-step
learning-rate schedule (warmup, cosine / step / constant, stabilisation)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def param_groups(model: nn.Module, params, weight_decay: float, no_bias_decay: bool, no_bn_decay: bool,
                 own_lr: tuple[Callable[[str], bool], float] | None = None):
    """Optimizer groups: decayed, and (optionally) biases / BatchNorm parameters without decay;
    ``own_lr`` = (which parameter names, learning rate): those at that rate, without decay."""
    wanted = {id(p) for p in params}
    own, own_names = [], own_lr[0] if own_lr else (lambda name: False)
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) not in wanted or not p.requires_grad:
            continue
        is_bn = id(p) in bn_params
        if own_names(name):
            own.append(p)
        elif (no_bn_decay and is_bn) or (no_bias_decay and name.endswith("bias")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    if own:
        groups.append({"params": own, "weight_decay": 0.0, "lr": own_lr[1], "name": "own_lr"})
    return groups


def lr_factor(step: int, recipe: dict, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at an optimizer step."""
    main = recipe["epochs"] * steps_per_epoch
    if step >= main:  # distribution stabilisation: a small constant rate
        return recipe["stabilize_lr"] / recipe["lr"]
    warm = recipe["warmup_epochs"] * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if recipe["schedule"] == "cosine":
        t = (step - warm) / max(1, main - warm)
        floor = recipe["lr_min"] / recipe["lr"]
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if recipe["schedule"] == "step":
        return recipe["step_gamma"] ** ((step // steps_per_epoch) // recipe["step_every"])
    return 1.0


def build_optimizer(model: nn.Module, params, recipe: dict, steps_per_epoch: int, device_type: str,
                    own_lr: tuple[Callable[[str], bool], float] | None = None):
    """SGD with the recipe's groups, its per-step LambdaLR schedule (every group's rate follows
    it), and a gradient scaler (active for fp16 autocast only)."""
    groups = param_groups(model, params, recipe["weight_decay"], recipe["no_bias_decay"], recipe["no_bn_decay"],
                          own_lr)
    opt = torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe["momentum"], nesterov=recipe["nesterov"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, recipe, steps_per_epoch))
    scaler = torch.amp.GradScaler(device_type, enabled=recipe["precision"] == "fp16")
    return opt, sched, scaler
