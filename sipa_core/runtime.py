"""Where a run executes and what it records about it: the training device,
and the provenance every metrics file carries (seed, device, versions, wall
time). A leaf module: it imports nothing else of the package but errors and
the process-group helpers."""

from __future__ import annotations

import platform
import time

import torch

from sipa_core.distributed import local_rank, rank_and_world
from sipa_core.errors import SipaError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (under torchrun: each process its own GPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SipaError(f"recipe.device: unknown device {name!r} (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SipaError(f"recipe.device: {name} asked for, but no CUDA device is available")
    return device


_TRAINED: list[tuple[float, int, int]] = []  # (when, images, epochs) noted in this process
_TEACHER: list[tuple[float, int]] = []  # (when, images) a distillation teacher evaluated


def record_training(images: int, epochs: int = 1) -> None:
    """The note of training a result cost: an epoch the engine ran, or epochs done by an
    earlier process that this one resumes or whose kept result it uses."""
    _TRAINED.append((time.time(), int(images), int(epochs)))


def record_teacher(images: int) -> None:
    """The note of a teacher's forward passes over ``images`` (distillation)."""
    _TEACHER.append((time.time(), int(images)))


def training_cost(since: float) -> dict:
    """Training images and epochs noted since ``since`` (a stage's or a unit's start): what the
    result cost, the same whether the work ran here or was resumed or kept from an earlier run;
    with distillation, the images the teacher evaluated too (``teacher_images``)."""
    done = [(n, e) for t, n, e in _TRAINED if t >= since]
    cost = {"images_trained": sum(n for n, _ in done), "train_epochs": sum(e for _, e in done)}
    teacher = sum(n for t, n in _TEACHER if t >= since)
    return {**cost, "teacher_images": teacher} if teacher else cost


def provenance(*, seed: int, device: str, started: float) -> dict:
    """What every metrics file records: seed, device, data-parallel processes, versions, wall time
    (of this process), and the training the result cost (images, epochs; the same for a resumed run)."""
    return dict(seed=seed, device=str(resolve_device(device)), processes=rank_and_world()[1], torch=torch.__version__,
                python=platform.python_version(), wall_time_s=round(time.time() - started, 2),
                **training_cost(started))
