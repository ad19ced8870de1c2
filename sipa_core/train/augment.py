"""Batched augmentation and targets, on whatever device the batch lives on.

The prepared data set stays a uint8 tensor; every step takes a batch of it
and applies crop, flip, policy, normalisation and mixing as tensor
operations over the whole batch (no per-image Python work).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from sipa_core.train.sipa_policy import SipaPolicy

_POLICIES = {
    "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),  # 25 sub-policies
    "randaugment": lambda: v2.RandAugment(),
    "trivialaugment": lambda: v2.TrivialAugmentWide(),
}


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch, by one gather."""
    if padding <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # b,1,h,1
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # b,1,1,w
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class PolicyAugment:
    """A torchvision policy (AutoAugment/RandAugment/TrivialAugment) on a uint8 batch.

    torchvision samples one op per call for a whole batch tensor; calling it
    on groups of ``group`` images keeps the batched kernels while giving
    different images different ops. Its randomness is torch's global RNG,
    which the engine seeds and checkpoints.
    """

    def __init__(self, name: str, group: int = 8):
        self.policy = _POLICIES[name]()
        self.group = group

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        return torch.cat([self.policy(chunk) for chunk in x.split(self.group)])


def make_policy(name: str, group: int = 8):
    """The recipe's ``augment`` as a callable ``policy(batch, generator)`` (None for ``none``)."""
    if name == "none":
        return None
    if name == "sipa_cifar100":
        return SipaPolicy()
    return PolicyAugment(name, group)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 batch -> float, scaled to [0, 1], standardised per channel."""
    out = (x.float().div_(255) - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def soft_targets(y: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing; each row sums to one."""
    t = torch.full((y.shape[0], num_classes), smoothing / num_classes, device=y.device)
    t.scatter_(1, y[:, None], 1.0 - smoothing + smoothing / num_classes)
    return t


def _beta(alpha: float, gen: torch.Generator) -> float:
    # Beta(a, a) from two Gamma(a) draws, on the CPU generator (seeded, checkpointed).
    g = torch._standard_gamma(torch.full((2,), float(alpha)), generator=gen)
    return float(g[0] / g.sum())


def mixup(x, targets, alpha: float, gen: torch.Generator):
    """One lambda per batch: x' = lam x + (1 - lam) x[perm], same for the targets."""
    lam = _beta(alpha, gen)
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def cutmix(x, targets, alpha: float, gen: torch.Generator):
    """Paste one random box from a permuted batch; targets mix by the box's area."""
    lam = _beta(alpha, gen)
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    h, w = x.shape[2:]
    cut = (1 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, (1,), generator=gen))
    cx = int(torch.randint(0, w, (1,), generator=gen))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    area = (y1 - y0) * (x1 - x0) / (h * w)
    return out, (1 - area) * targets + area * targets[perm]
