"""Evaluation: logits and top-1 accuracy of a uint8 image split, and the
weights cast to fp16 and back (the accuracy that goes with a 16-bit score)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sipa_core.data.prepare import PreparedData
from sipa_core.train.augment import normalize


def channel_stats_tensor(values, device) -> torch.Tensor:
    """Per-channel normalisation values as a (1, C, 1, 1) float tensor on ``device``."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def normalized(x: torch.Tensor, mean, std, *, channels_last: bool = False) -> torch.Tensor:
    """uint8 images to normalised float input, on ``x``'s device."""
    return normalize(x, channel_stats_tensor(mean, x.device), channel_stats_tensor(std, x.device), channels_last)


def half_weights(model: nn.Module) -> nn.Module:
    """A copy whose weights went through fp16 and back: the 16-bit freebie's accuracy."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(clone.parameters()) + list(clone.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return clone


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, mean, std, *, batch_size: int = 500, device=None,
            fp16_weights: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Logits (float32, on the CPU) of a uint8 image tensor, in evaluation mode."""
    device = device or next(model.parameters()).device
    net = half_weights(model) if fp16_weights else model
    was_training = net.training
    net.eval()
    mean_t, std_t = channel_stats_tensor(mean, device), channel_stats_tensor(std, device)
    outs = []
    for chunk in x.split(batch_size):
        xb = normalize(chunk.to(device, non_blocking=True), mean_t, std_t, channels_last)
        outs.append(net(xb).float().cpu())
    net.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` (or of predicted labels, 1-D) against ``y``; NaN when empty."""
    if len(y) == 0:
        return float("nan")
    pred = logits.argmax(1) if logits.dim() == 2 else logits
    return float((pred == y.cpu()).float().mean())


def evaluate(model: nn.Module, data: PreparedData, split: str = "test", *, fp16_weights: bool = False,
             batch_size: int = 500) -> float:
    """Top-1 accuracy on a split (``fp16_weights``: of the 16-bit weights)."""
    x, y = data.split(split)
    if len(y) == 0:
        return float("nan")
    return accuracy(predict(model, x, data.mean, data.std, batch_size=batch_size, fp16_weights=fp16_weights), y)
