"""A training run's resumable state: everything ``fit`` needs to continue a
killed run exactly (model, optimizer, scheduler, scaler, epoch, history, RNG
states), written atomically at every epoch end and read back only into the
same run (its fingerprint)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from sipa_core.data.prepare import PreparedData
from sipa_core.io import atomic_torch_save, load_checkpoint
from sipa_core.resume import run_key

STATE_FORMAT = "sipa-train-state"


def fingerprint(model: nn.Module, data: PreparedData, recipe: dict, tag: str = "") -> str:
    """Identity of a training run: resuming is only allowed into the same run."""
    return run_key({"recipe": recipe, "spec": getattr(model, "spec", None), "source": data.source,
                    "n": int(data.train_y.numel()), "tag": tag,
                    "shapes": [list(p.shape) for p in model.parameters()]}, length=16)


def save_state(path: Path | None, run, epoch: int, history: list[dict]) -> None:
    """The state after ``epoch`` finished epochs (rank 0 only; no path: nothing saved)."""
    if path is None or run.rank != 0:
        return
    atomic_torch_save(path, {
        "format": STATE_FORMAT, "fingerprint": run.fingerprint, "epoch": epoch, "history": history,
        "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
        "scaler": run.scaler.state_dict(), "rng_cpu": torch.get_rng_state(), "rng_data": run.gen.get_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else None,
    })


def restore_state(path: Path | None, run, desc: str, total_epochs: int) -> tuple[int, list[dict]]:
    """Load the state of this run (same fingerprint) into ``run``; returns (epochs done, history)."""
    if path is None or not path.exists():
        return 0, []
    state = load_checkpoint(path, "training state")
    if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT
            and state.get("fingerprint") == run.fingerprint):
        return 0, []
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    run.gen.set_state(state["rng_data"])
    if run.device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    epoch = int(state["epoch"])
    if epoch and run.rank == 0:
        print(f"{desc}: resuming after epoch {epoch}/{total_epochs} from {path}", file=sys.stderr)
    return epoch, list(state["history"])
