"""The quantization record of a checkpoint, and loading a quantized checkpoint.

The quantizing stage writes it (``QuantRecord.as_dict``); ``QuantRecord.of``
reads and checks it. It holds the widths the main network was trained and is
counted at (``scoring.bits.BitWidths``), the quantizer of each layer's input
(``quantizers.Quantizers``), and, with an exit, the exit's own widths and
quantizers. ``load_quantized`` rebuilds the network a quantized checkpoint
describes (BatchNorm folded, Brevitas layers at the recorded widths) and
loads its weights; nothing before the quantizing stage imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sipa_core.accelerate.exits import EarlyExitNetwork
from sipa_core.accelerate.record import ExitRecord
from sipa_core.checkpoint import Checkpoint, read_checkpoint
from sipa_core.errors import SipaError
from sipa_core.models import create_model
from sipa_core.quantize.qat import fold_batchnorm, quantize_modules
from sipa_core.quantize.quantizers import Quantizers
from sipa_core.scoring.bits import BitWidths


@dataclass(frozen=True)
class QuantRecord:
    """How a checkpoint's network is quantized: its widths and quantizers (the exit's too)."""

    widths: BitWidths
    quantizers: Quantizers
    exit_widths: BitWidths | None = None
    exit_quantizers: Quantizers | None = None

    def as_dict(self) -> dict:
        out = {"widths": self.widths.as_dict(), "label": self.widths.label(), "batchnorm_folded": True,
               "quantizers": self.quantizers.as_record()}
        if self.exit_widths is not None:
            out.update(exit_widths=self.exit_widths.as_dict(), exit_quantizers=self.exit_quantizers.as_record())
        return out

    @classmethod
    def from_dict(cls, raw: dict, path) -> QuantRecord:
        try:
            widths = BitWidths.from_dict(raw["widths"])
            quantizers = Quantizers.from_record(raw.get("quantizers"))
            has_exit = raw.get("exit_widths") is not None
            exit_widths = BitWidths.from_dict(raw["exit_widths"]) if has_exit else None
            exit_quantizers = Quantizers.from_record(raw.get("exit_quantizers")) if has_exit else None
        except (KeyError, TypeError, ValueError, SipaError) as err:
            raise SipaError(f"{path}: malformed quantization record ({str(err).splitlines()[0]}); run the "
                            f"quantize stage again") from None
        return cls(widths, quantizers, exit_widths, exit_quantizers)

    @classmethod
    def of(cls, ckpt: Checkpoint) -> QuantRecord | None:
        raw = ckpt.record("quant")
        return None if raw is None else cls.from_dict(raw, ckpt.path)

    @property
    def label(self) -> str:
        return self.widths.label()


def quantized_structure(model: nn.Module, widths: BitWidths, quantizers: Quantizers) -> nn.Module:
    """Turn a freshly built float network (or exit) into the structure of a quantized one: BatchNorm
    folded, layers quantized at ``widths`` with ``quantizers``. The weights are loaded after this."""
    fold_batchnorm(model)
    quantize_modules(model, widths, quantizers)
    return model


def _load(module: nn.Module, state: dict, path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)  # Brevitas restores its lazily made scales itself
    except RuntimeError as err:
        raise SipaError(f"{path}: quantized {what} does not load: {str(err).splitlines()[0]}") from None


@dataclass
class QuantizedNetwork:
    """A quantized checkpoint as networks: the main network, with its exit where one was kept."""

    main: nn.Module
    record: QuantRecord
    exit: ExitRecord | None = None
    net: EarlyExitNetwork | None = None


def load_quantized(path: str | Path) -> QuantizedNetwork:
    """A quantized checkpoint (the quantize stage's), rebuilt and loaded."""
    ckpt = read_checkpoint(path)
    record = QuantRecord.of(ckpt)
    if record is None or ckpt.arch is None:
        raise SipaError(f"{path}: not a quantized checkpoint (no quantization record)")
    main = quantized_structure(create_model(ckpt.arch), record.widths, record.quantizers)
    _load(main, ckpt.state, path, "network")
    exit_record = ExitRecord.of(ckpt)
    if exit_record is None:
        return QuantizedNetwork(main.eval(), record)
    if record.exit_widths is None:
        raise SipaError(f"{path}: malformed quantization record (an exit without its widths); run the quantize "
                        f"stage again")
    net = EarlyExitNetwork(main, exit_record.config)
    quantized_structure(net.exit, record.exit_widths, record.exit_quantizers)
    _load(net.exit, exit_record.state, path, "exit")
    return QuantizedNetwork(main.eval(), record, exit_record, net.eval())
