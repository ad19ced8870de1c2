"""A training run's resumable state: everything ``fit`` needs to continue a
killed run exactly (model, optimizer, scheduler, scaler, epoch, history, RNG
states), written atomically at every epoch end and read back only into the
same run (its fingerprint)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from sipa_core.data.prepared import PreparedData
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


def read_state(path: Path | None, run_fingerprint: str) -> dict | None:
    """The saved state of this run (same fingerprint), or None: absent, or another run's."""
    if path is None or not path.exists():
        return None
    state = load_checkpoint(path, "training state")
    if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT
            and state.get("fingerprint") == run_fingerprint):
        return None
    return {**state, "path": str(path)}


def load_model_state(model: nn.Module, weights: dict, params=None) -> list | None:
    """Load a saved run's model weights *before* the optimizer and any wrapper take its parameters.
    Some modules replace a parameter object when loading (Brevitas does for its activation scales
    and zero points): an optimizer built earlier would go on holding the stale objects, those
    parameters would stop training, and a resumed run would drift from an uninterrupted one.
    ``params``, a subset of the model's parameters chosen before loading, is returned as the
    model's parameters of the same names after it."""
    names = {id(p): n for n, p in model.named_parameters()}
    wanted = None if params is None else [names[id(p)] for p in params]
    model.load_state_dict(weights)
    current = dict(model.named_parameters())
    return None if wanted is None else [current[n] for n in wanted]


def restore_run(state: dict | None, run, desc: str, total_epochs: int) -> tuple[int, list[dict]]:
    """The rest of a saved run (optimizer, scheduler, scaler, RNG states) into ``run``, its model
    already loaded (``load_model_state``); returns (epochs done, history)."""
    if state is None:
        return 0, []
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    run.gen.set_state(state["rng_data"])
    if run.device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    epoch = int(state["epoch"])
    if epoch and run.rank == 0:
        print(f"{desc}: resuming after epoch {epoch}/{total_epochs} from {state['path']}", file=sys.stderr)
    return epoch, list(state["history"])
