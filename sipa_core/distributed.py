"""Data-parallel training across processes (``torchrun``): one place for the
process group, ranks and devices.

Semantics (documented in the README): ``recipe.batch_size`` is the *global*
batch; each of W processes trains on its slice of batch_size / W images of
every step, after augmenting and mixing the global batch identically on all
processes, and DistributedDataParallel averages the gradients. The only
differences from one process are BatchNorm (statistics per process, as ghost
BatchNorm with a virtual batch of batch_size / W; running statistics are
rank 0's) and dropout / drop-connect masks, drawn per process. Only rank 0
writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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
