"""Model checkpoints: the architecture spec travels with the weights.

A sipa checkpoint is a dict ``{"format": "sipa-checkpoint", "version": 1,
"arch": <spec>, "model": <state_dict>, ...}``; training stages add optimizer,
scheduler, epoch and RNG state to it. A plain state_dict from elsewhere can be
loaded too, given the architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sipa_core.errors import SipaError
from sipa_core.io import atomic_torch_save, load_checkpoint
from sipa_core.models import create_model, create_spec, create_family_spec
from sipa_core.params import load_yaml
from sipa_core.quantize.qat import quantized_structure

FORMAT = "sipa-checkpoint"
VERSION = 1


def save_model(path, model: nn.Module, **extra) -> Path:
    spec = getattr(model, "spec", None)
    if spec is None:
        raise SipaError("only models built by sipa_core.models carry the spec a checkpoint needs")
    return atomic_torch_save(path, {"format": FORMAT, "version": VERSION, "arch": dict(spec),
                                    "model": model.state_dict(), **extra})


def _state_dict_of(obj, path) -> dict:
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if not isinstance(obj.get("model"), dict):
            raise SipaError(f"{path}: sipa checkpoint without a 'model' state dict")
        return obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in obj.items()):
        return obj  # a bare state_dict
    raise SipaError(f"{path}: not a sipa checkpoint nor a state_dict (a mapping of names to tensors)")


def fit_state_dict(model: nn.Module, state: dict, path, arch_name: str) -> None:
    """Load ``state`` strictly; a mismatch is a SipaError that says what differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
        raise SipaError(f"{path}: checkpoint does not fit architecture {arch_name}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def load_model(path, arch: dict | str | None = None) -> tuple[nn.Module, dict]:
    """Build the checkpoint's architecture (or ``arch``) and load its weights."""
    obj = load_checkpoint(path)
    state = _state_dict_of(obj, path)
    if arch is None:
        if not (isinstance(obj, dict) and isinstance(obj.get("arch"), dict)):
            raise SipaError(f"{path}: a bare state_dict needs an architecture (--arch)")
        arch = obj["arch"]
    model = create_model(arch)
    quant = obj.get("quant") if isinstance(obj, dict) else None
    if quant:  # a quantized checkpoint: BatchNorm folded, Brevitas layers at its widths
        try:
            quantized_structure(model, quant)
            model.load_state_dict(state, strict=True)  # Brevitas restores its lazily made scales itself
        except (SipaError, RuntimeError) as err:
            raise SipaError(f"{path}: quantized checkpoint does not load: {str(err).splitlines()[0]}") from None
        return model, obj
    fit_state_dict(model, state, path, model.spec.get("name") or model.spec["family"])
    return model, obj if isinstance(obj, dict) else {}


def create_spec_from(value: str, **overrides) -> tuple[dict, Path | None]:
    """An architecture spec from a registered name, a spec YAML or a sipa checkpoint.

    Returns the spec (with ``overrides``) and the checkpoint path when
    ``value`` named one. A YAML file may hold the spec itself or under ``arch``.
    """
    path = Path(value)
    if value.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise SipaError(f"architecture file {value} not found")
        raw = load_yaml(path)
        raw = raw.get("arch", raw)
        if not isinstance(raw, dict) or "family" not in raw:
            raise SipaError(f"{value}: no architecture spec here (a mapping with a 'family' key)")
        fields = {k: v for k, v in raw.items() if k != "family"}
        return create_family_spec(raw["family"], **{**fields, **overrides}), None
    if value.endswith((".pt", ".pth")):
        model, _ = load_model(value)
        fields = {k: v for k, v in model.spec.items() if k != "family"}
        return create_family_spec(model.spec["family"], **{**fields, **overrides}), path
    return create_spec(value, **overrides), None
