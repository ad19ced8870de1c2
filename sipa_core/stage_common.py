"""What every model stage shares: resolving the architecture, loading the
prepared data and the previous stage's checkpoint, and the metrics record
(MicroNet keys + accuracy + provenance)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sipa_core.checkpoint import Checkpoint, build_model, create_spec_from, read_checkpoint
from sipa_core.data.prepared import PreparedData, load_prepared
from sipa_core.errors import SipaError
from sipa_core.models import create_model
from sipa_core.scoring import count
from sipa_core.runtime import provenance
from sipa_core.train.evaluation import evaluate


def resolve_arch(value: str, data: PreparedData, where: str) -> tuple[dict, Path | None]:
    """The spec of ``value`` (name, spec YAML or checkpoint) for this data: its
    classes and image size. Returns the spec and the checkpoint path, if any."""
    h, w = data.image_size
    if h != w:
        raise SipaError(f"{where}: the data's images are {h}x{w}; the networks take square images")
    try:
        return create_spec_from(value, num_classes=data.num_classes, image_size=h)
    except SipaError as err:
        raise SipaError(f"{where}: {err}") from None


def create_seeded_model(spec: dict, seed: int, init: Path | None = None) -> nn.Module:
    """A model from ``spec`` with seeded initialisation, or the weights of ``init``."""
    torch.manual_seed(seed)
    model = create_model(spec)
    if init is not None:
        ckpt = read_checkpoint(init)
        refuse_quantized(ckpt, init, "the weights to start from must be floating point")
        model.load_state_dict(build_model(ckpt, spec).state_dict())
    return model


def load_input_model(path: str | Path, data: PreparedData, where: str, producer: str) -> tuple[nn.Module, Checkpoint]:
    """The previous stage's floating-point checkpoint (model, checkpoint), checked against the data."""
    path = Path(path)
    if not path.is_file():
        raise SipaError(f"{where}: checkpoint {path} not found; run the {producer} stage first")
    try:
        ckpt = read_checkpoint(path)
        refuse_quantized(ckpt, path, f"this stage takes a floating-point checkpoint (the {producer} stage's)")
        model = build_model(ckpt)
    except SipaError as err:
        raise SipaError(f"{where}: {err}") from None
    if model.spec.get("num_classes") != data.num_classes:
        raise SipaError(f"{where}: {path} predicts {model.spec.get('num_classes')} classes, "
                        f"the data has {data.num_classes}")
    return model, ckpt


def refuse_quantized(ckpt: Checkpoint, path, why: str) -> None:
    """A quantized checkpoint (the quantize stage's) where a floating-point one is needed is an error."""
    if ckpt.quantized:
        label = ckpt.record("quant").get("label", "quantized")
        raise SipaError(f"{path} is already quantized ({label}, written by the quantize stage); {why}")


def load_data(path: str | Path, where: str) -> PreparedData:
    if not Path(path).is_file():
        raise SipaError(f"{where}: prepared data {path} not found; run the prepare stage first (dvc repro prepare)")
    return load_prepared(path)


def score_metrics(model: nn.Module, data: PreparedData, bits: int = 16, **count_kw) -> dict:
    """The flat MicroNet keys for a model on this data's input size."""
    h, w = data.image_size
    return count(model, (3, h, w), bits=bits, **count_kw).summary()


def stage_metrics(model: nn.Module, data: PreparedData, *, seed: int, device: str, started: float,
                  bits: int = 16, **extra) -> dict:
    """Metrics of a stage's result: score keys, accuracy of the weights at the
    counted bit width (run at 16 bits under the 16-bit freebie), provenance."""
    fp16 = bits == 16
    metrics = score_metrics(model, data, bits)
    metrics["accuracy"] = evaluate(model, data, "test", fp16=fp16)
    metrics["accuracy_fp32"] = evaluate(model, data, "test")
    if len(data.val_y):
        metrics["val_accuracy"] = evaluate(model, data, "val", fp16=fp16)
    metrics.update(extra)
    metrics.update(provenance(seed=seed, device=device, started=started))
    return metrics

