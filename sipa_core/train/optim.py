"""The optimizer side of a recipe: SGD parameter groups and the per-step
learning-rate schedule (warmup, cosine / step / constant, stabilisation)."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, params, weight_decay: float, no_bias_decay: bool, no_bn_decay: bool):
    """Optimizer groups: decayed, and (optionally) biases / BatchNorm parameters without decay."""
    wanted = {id(p) for p in params}
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) not in wanted or not p.requires_grad:
            continue
        is_bn = id(p) in bn_params
        if (no_bn_decay and is_bn) or (no_bias_decay and name.endswith("bias")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
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


def build_optimizer(model: nn.Module, params, recipe: dict, steps_per_epoch: int, device_type: str):
    """SGD with the recipe's groups, its per-step LambdaLR schedule, and a
    gradient scaler (active for fp16 autocast only)."""
    groups = param_groups(model, params, recipe["weight_decay"], recipe["no_bias_decay"], recipe["no_bn_decay"])
    opt = torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe["momentum"], nesterov=recipe["nesterov"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, recipe, steps_per_epoch))
    scaler = torch.amp.GradScaler(device_type, enabled=recipe["precision"] == "fp16")
    return opt, sched, scaler
