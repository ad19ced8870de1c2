"""Building pieces shared by the architectures: activations by name, convs
with EfficientNet's static "same" padding, conv-BN-activation, squeeze-excite."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sipa_core.errors import SipaError

ACTIVATIONS = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "celu": nn.CELU,
    "leaky_relu": nn.LeakyReLU,
    "hardswish": nn.Hardswish,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise SipaError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}") from None


_ACTIVATION_TYPES = tuple(set(ACTIVATIONS.values()))


def swap_activations(model: nn.Module, name: str) -> int:
    """Replace every activation module by ``name``'s (they hold no weights)."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, _ACTIVATION_TYPES):
                setattr(parent, child_name, make_activation(name))
                replaced += 1
    return replaced


def same_padding(kernel: int, stride: int, nominal: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) for a nominal input size.

    The authors compute padding once, as if the image had its nominal (data)
    size; with the upsampled input this gives the asymmetric 0/1 padding of
    the stride-2 layers and the 63 -> 31 -> 15 -> 7 sizes of the baseline.
    """
    out = math.ceil(nominal / stride)
    total = max((out - 1) * stride + kernel - nominal, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d whose padding is fixed from a nominal input size."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, groups=1, bias=False, nominal=32):
        before, after = same_padding(kernel, stride, nominal)
        symmetric = before == after
        super().__init__(in_ch, out_ch, kernel, stride, padding=before if symmetric else 0,
                         groups=groups, bias=bias)
        self.extra_pad = None if symmetric else (before, after, before, after)

    def forward(self, x):
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        return super().forward(x)


class ConvBNAct(nn.Sequential):
    def __init__(self, in_ch, out_ch, kernel, stride=1, groups=1, act: str | None = "swish",
                 nominal=32, bn_eps=1e-3, bn_momentum=0.1):
        layers = [SameConv2d(in_ch, out_ch, kernel, stride, groups, nominal=nominal),
                  nn.BatchNorm2d(out_ch, eps=bn_eps, momentum=bn_momentum)]
        if act:
            layers.append(make_activation(act))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """SE: global pool, 1x1 reduce (bias), activation, 1x1 expand (bias), sigmoid gate."""

    def __init__(self, channels: int, se_channels: int, act: str = "swish"):
        super().__init__()
        self.reduce = nn.Conv2d(channels, se_channels, 1, bias=True)
        self.act = make_activation(act)
        self.expand = nn.Conv2d(se_channels, channels, 1, bias=True)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        s = self.expand(self.act(self.reduce(s)))
        return x * torch.sigmoid(s)


def drop_connect(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (EfficientNet's drop-connect)."""
    if not training or rate <= 0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep
