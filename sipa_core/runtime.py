"""Where a run executes and what it records about it: the training device,
and the provenance every metrics file carries (seed, device, versions, wall
time). A leaf module: it imports nothing else of the package but errors and
the process-group helpers."""

from __future__ import annotations

import platform
import time

import torch

from sipa_core.errors import SipaError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (under torchrun: each process its own GPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        from sipa_core.distributed import local_rank

        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SipaError(f"recipe.device: unknown device {name!r} (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SipaError(f"recipe.device: {name} asked for, but no CUDA device is available")
    return device


_TRAINED: list[tuple[float, int]] = []  # (when, images) per training epoch of this process


def record_training(images: int) -> None:
    """The engine's note of one training epoch and the images it processed."""
    _TRAINED.append((time.time(), int(images)))


def training_cost(since: float) -> dict:
    """Training images and epochs of this process since ``since`` (a stage's start)."""
    done = [n for t, n in _TRAINED if t >= since]
    return {"images_trained": sum(done), "train_epochs": len(done)}


def provenance(*, seed: int, device: str, started: float) -> dict:
    """What every metrics file records: seed, device, versions, wall time, and the training
    it cost (images processed, epochs run; search trials in Ray workers are not seen here)."""
    return dict(seed=seed, device=str(resolve_device(device)), torch=torch.__version__,
                python=platform.python_version(), wall_time_s=round(time.time() - started, 2),
                **training_cost(started))
