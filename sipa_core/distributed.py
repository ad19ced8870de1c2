"""Data-parallel training across processes (``torchrun``): one place for the
process group, ranks and devices.

Semantics (documented in the README): ``recipe.batch_size`` is the *global*
batch; each of W processes trains on its slice of batch_size / W images of
every step, after augmenting and mixing the global batch identically on all
processes, and DistributedDataParallel averages the gradients. The only
differences from one process are BatchNorm (statistics per process, as ghost
BatchNorm with a virtual batch of batch_size / W) and dropout / drop-connect
masks, drawn per process. BatchNorm's running statistics are kept as that one
process keeps them (``RunningStats``: each process's updates of a step applied
in rank order, on every process), so W processes end with the network one
process with ``ghost_batch: batch_size / W`` ends with. Only rank 0 writes files.
"""

from __future__ import annotations

import os

import math

import torch
import torch.distributed as dist
from torch import nn


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env() -> bool:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1):
    NCCL with one GPU per process where GPUs exist, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over processes (itself with one process)."""
    _, world = rank_and_world()
    if world == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def _updates_per_step(bn: nn.Module, local_batch: int) -> int:
    """How many times a BatchNorm updates its running statistics in one forward of ``local_batch``
    images: once per virtual batch of a ghost BatchNorm, once otherwise."""
    virtual = getattr(bn, "virtual_batch", None)
    return math.ceil(local_batch / virtual) if virtual and local_batch > virtual else 1


class RunningStats:
    """BatchNorm running statistics across data-parallel processes, as one process keeps them.

    One process with ghost BatchNorm updates a layer's running mean and variance once per
    virtual batch, in batch order: R <- (1 - m) R + m c. Each of W processes updates from its
    own slice, which holds virtual batches number r*k .. r*k + k - 1 of the global batch. The
    update is linear, so a process's change D_r = S_r - (1 - m)^k R (S_r: its statistics after
    the step, R: before) carries its virtual batches' part; ``after_step`` gathers every D_r and
    applies them in rank order, R <- (1 - m)^k R + D_r, on every process. One all_gather of the
    layers' statistics per step; layers in evaluation mode (frozen) are left alone."""

    def __init__(self, model: nn.Module, local_batch: int):
        self.layers = [(m, _updates_per_step(m, local_batch)) for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                       and m.momentum is not None]
        self.before: list[tuple[nn.Module, int]] = []
        self.saved: torch.Tensor | None = None

    def before_step(self) -> None:
        self.before = [(m, k) for m, k in self.layers if m.training]
        self.saved = torch.cat([torch.cat([m.running_mean, m.running_var]) for m, _ in self.before]) \
            if self.before else None

    @torch.no_grad()
    def after_step(self) -> None:
        if self.saved is None:
            return
        keep = torch.cat([torch.full((2 * m.num_features,), (1 - m.momentum) ** k, device=self.saved.device)
                          for m, k in self.before])
        now = torch.cat([torch.cat([m.running_mean, m.running_var]) for m, _ in self.before])
        gathered = [torch.empty_like(now) for _ in range(rank_and_world()[1])]
        dist.all_gather(gathered, now - keep * self.saved)
        stats = self.saved
        for change in gathered:
            stats = keep * stats + change
        for m, _ in self.before:
            n = m.num_features
            m.running_mean.copy_(stats[:n])
            m.running_var.copy_(stats[n:2 * n])
            stats = stats[2 * n:]
