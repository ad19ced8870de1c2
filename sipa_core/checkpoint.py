"""Model checkpoints: the architecture spec travels with the weights and the records.

A sipa checkpoint is a dict ``{"format": "sipa-checkpoint", "version": 1,
"arch": <spec>, "model": <state_dict>, ...}`` of plain data (it loads with
``weights_only=True``). ``read_checkpoint`` checks it and returns a
``Checkpoint``: the records every stage writes (``stage``, ``recipe``,
``lineage``, ``masks``) typed here, and the records of later stages
(``exit``: the accelerate stage's, ``quant``: the quantizing stage's) kept as
stored, each read by its own class in its own package
(``accelerate.record.ExitRecord``, ``quantize.record.QuantRecord``), so that
loading a checkpoint imports no code of a later stage. ``load_model`` builds
a floating-point network; a quantized checkpoint is built by
``quantize.record.load_quantized``. A plain state_dict from elsewhere can be
loaded too, given the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from sipa_core.errors import SipaError
from sipa_core.io import atomic_torch_save, load_checkpoint
from sipa_core.lineage import Lineage
from sipa_core.models import create_family_spec, create_model, create_spec
from sipa_core.params import load_yaml

FORMAT = "sipa-checkpoint"
VERSION = 1
LATER_RECORDS = ("exit", "quant")  # read by accelerate.record and quantize.record
_KNOWN = {"format", "version", "arch", "model", "stage", "recipe", "lineage", "masks", "adopted", "pruned_round",
          *LATER_RECORDS}


class Record(Protocol):
    def as_dict(self) -> dict: ...


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read: the network's spec and weights and its records."""

    path: str
    arch: dict | None
    state: dict
    stage: str | None = None
    recipe: dict | None = None
    lineage: Lineage | None = None
    masks: dict | None = None  # parameter name -> bool tensor (the pruning masks)
    adopted: list | None = None
    pruned_round: int | None = None
    records: dict = field(default_factory=dict)  # later stages' records as stored

    @property
    def quantized(self) -> bool:
        return self.records.get("quant") is not None

    def record(self, name: str) -> dict | None:
        return self.records.get(name)


def save_model(path, model: nn.Module, *, stage: str | None = None, recipe: dict | None = None,
               lineage: Lineage | None = None, masks: dict | None = None, adopted: list | None = None,
               pruned_round: int | None = None, records: dict[str, Record] | None = None) -> Path:
    """The one writer of checkpoints: the model's spec and weights and the records given."""
    spec = getattr(model, "spec", None)
    if spec is None:
        raise SipaError("only models built by sipa_core.models carry the spec a checkpoint needs")
    unknown = set(records or {}) - set(LATER_RECORDS)
    if unknown:
        raise SipaError(f"unknown checkpoint record(s): {', '.join(sorted(unknown))}")
    extra = {"stage": stage, "recipe": recipe, "lineage": lineage.as_dict() if lineage else None, "masks": masks,
             "adopted": adopted, "pruned_round": pruned_round,
             **{name: r.as_dict() for name, r in (records or {}).items()}}
    return atomic_torch_save(path, {"format": FORMAT, "version": VERSION, "arch": dict(spec),
                                    "model": model.state_dict(), **{k: v for k, v in extra.items() if v is not None}})


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def _check_masks(masks, path) -> dict | None:
    if masks is None:
        return None
    if not (isinstance(masks, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            and v.dtype == torch.bool for k, v in masks.items())):
        raise SipaError(f"{path}: malformed masks record (expected parameter names to boolean tensors)")
    return masks


def read_checkpoint(path) -> Checkpoint:
    """The one reader: a sipa checkpoint checked field by field, or a bare state_dict (no records).
    Anything else, an unknown record (another version) or a malformed one: one line naming the file."""
    obj = load_checkpoint(path)
    if _is_state_dict(obj):
        return Checkpoint(str(path), None, obj)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        raise SipaError(f"{path}: not a sipa checkpoint nor a state_dict (a mapping of names to tensors)")
    if obj.get("version") != VERSION:
        raise SipaError(f"{path}: sipa checkpoint version {obj.get('version')!r}; this sipa reads version {VERSION}")
    unknown = sorted(set(obj) - _KNOWN)
    if unknown:
        raise SipaError(f"{path}: unknown checkpoint record {unknown[0]!r} (written by another version of sipa)")
    if not isinstance(obj.get("model"), dict) or not isinstance(obj.get("arch"), dict):
        raise SipaError(f"{path}: sipa checkpoint without its 'arch' spec and 'model' state dict")
    records = {name: obj[name] for name in LATER_RECORDS if obj.get(name) is not None}
    if any(not isinstance(r, dict) for r in records.values()):
        raise SipaError(f"{path}: malformed {', '.join(n for n, r in records.items() if not isinstance(r, dict))} "
                        f"record")
    lineage = Lineage.from_dict(obj["lineage"], path) if obj.get("lineage") is not None else None
    return Checkpoint(str(path), obj["arch"], obj["model"], obj.get("stage"), obj.get("recipe"), lineage,
                      _check_masks(obj.get("masks"), path), obj.get("adopted"), obj.get("pruned_round"), records)


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


def build_model(ckpt: Checkpoint, arch: dict | str | None = None) -> nn.Module:
    """The floating-point network of a checkpoint (its own spec, or ``arch``), weights loaded."""
    if ckpt.quantized:
        raise SipaError(f"{ckpt.path}: a quantized checkpoint (the quantize stage's); it loads with "
                        f"sipa_core.quantize.record.load_quantized, or is counted by `sipa score --checkpoint`")
    arch = arch if arch is not None else ckpt.arch
    if arch is None:
        raise SipaError(f"{ckpt.path}: a bare state_dict needs an architecture (--arch)")
    model = create_model(arch)
    fit_state_dict(model, ckpt.state, ckpt.path, model.spec.get("name") or model.spec["family"])
    return model


def load_model(path, arch: dict | str | None = None) -> tuple[nn.Module, Checkpoint]:
    """Read a floating-point checkpoint and build its network (or ``arch``'s)."""
    ckpt = read_checkpoint(path)
    return build_model(ckpt, arch), ckpt


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
        ckpt = read_checkpoint(value)
        if ckpt.arch is None:
            raise SipaError(f"{value}: a bare state_dict carries no architecture")
        fields = {k: v for k, v in ckpt.arch.items() if k != "family"}
        return create_family_spec(ckpt.arch["family"], **{**fields, **overrides}), path
    return create_spec(value, **overrides), None
