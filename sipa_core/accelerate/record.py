"""The exit record of a checkpoint: one writer (``ExitRecord.as_dict``), one reader
(``ExitRecord.of``), checked on load.

The accelerate stage writes it when it keeps an exit; the quantizing stage
writes it again with the threshold it re-calibrated on the quantized network.
It holds the exit's place and shape (``ExitConfig``), its weights, the chosen
threshold and the test exit ratio, the loss it trained with, and the exit rule
(``rule.ExitRule``) the threshold was chosen by. Stored flat, as plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from torch import nn

from sipa_core.accelerate.exits import LOSSES, EarlyExitNetwork, ExitConfig
from sipa_core.accelerate.rule import ExitRule
from sipa_core.checkpoint import Checkpoint, build_model, fit_state_dict, read_checkpoint
from sipa_core.errors import SipaError

_CONFIG_KEYS = tuple(f.name for f in fields(ExitConfig))


@dataclass(frozen=True)
class ExitRecord:
    """A kept exit: where and how large, its weights, its threshold, exit ratio, loss and rule."""

    config: ExitConfig
    state: dict
    threshold: float
    exit_ratio: float
    loss: str
    rule: ExitRule

    def as_dict(self) -> dict:
        return {**self.config.as_dict(), "state": self.state, "threshold": self.threshold,
                "exit_ratio": self.exit_ratio, "loss": self.loss,
                "rule": self.rule.as_record()}

    @classmethod
    def from_dict(cls, raw: dict, path) -> ExitRecord:
        missing = [k for k in (*_CONFIG_KEYS, "state", "threshold", "exit_ratio", "loss") if k not in raw]
        if missing:
            raise SipaError(f"{path}: malformed exit record (no {missing[0]!r}; written by an older accelerate "
                            f"stage?); run the accelerate stage again")
        if raw["loss"] not in LOSSES or not isinstance(raw["state"], dict):
            raise SipaError(f"{path}: malformed exit record (loss {raw['loss']!r} / weights)")
        try:
            config = ExitConfig(**{k: raw[k] for k in _CONFIG_KEYS})
        except TypeError as err:
            raise SipaError(f"{path}: malformed exit record ({err})") from None
        return cls(config, raw["state"], float(raw["threshold"]), float(raw["exit_ratio"]), raw["loss"],
                   ExitRule.from_dict(raw.get("rule"), path))

    @classmethod
    def of(cls, ckpt: Checkpoint) -> ExitRecord | None:
        """The checkpoint's exit record, or None when it kept no exit."""
        raw = ckpt.record("exit")
        return None if raw is None else cls.from_dict(raw, ckpt.path)


def float_exit_network(main: nn.Module, record: ExitRecord, path) -> EarlyExitNetwork:
    """The floating-point network with its exit, as the record describes it (weights loaded)."""
    net = EarlyExitNetwork(main, record.config)
    fit_state_dict(net.exit, record.state, path, "its exit module")
    return net


def load_early_exit(path: str | Path) -> tuple[EarlyExitNetwork, ExitRecord]:
    """A floating-point checkpoint with an exit (the accelerate stage's) as an ``EarlyExitNetwork``."""
    ckpt = read_checkpoint(path)
    record = ExitRecord.of(ckpt)
    if record is None:
        raise SipaError(f"{path}: no early exit in this checkpoint")
    return float_exit_network(build_model(ckpt), record, path).eval(), record
