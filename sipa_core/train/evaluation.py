"""Evaluation: logits and top-1 accuracy of a uint8 image split, and the network
run at 16 bits (the accuracy that goes with a 16-bit score: the MicroNet rules
count what is not quantized at 16 bits only when the network runs it there)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from sipa_core.data.prepared import PreparedData
from sipa_core.train.augment import normalize


def channel_stats_tensor(values, device) -> torch.Tensor:
    """Per-channel normalisation values as a (1, C, 1, 1) float tensor on ``device``."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def normalized(x: torch.Tensor, mean, std, *, channels_last: bool = False) -> torch.Tensor:
    """uint8 images to normalised float input, on ``x``'s device."""
    return normalize(x, channel_stats_tensor(mean, x.device), channel_stats_tensor(std, x.device), channels_last)


def _to_fp16(value):
    """A float32 tensor (or a tuple of them) rounded to fp16 and back; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.half().float()
    if isinstance(value, tuple):
        return tuple(_to_fp16(v) for v in value)
    return value


def integer_weights(module: nn.Module) -> bool:
    """A layer whose weights are integers times a scale (a Brevitas layer with its weight
    quantizer on, below 16 bits): run in integer arithmetic, not in fp16."""
    quant = getattr(module, "weight_quant", None)
    return quant is not None and quant.is_quant_enabled


def round_to_fp16(model: nn.Module, keep=lambda name: False) -> None:
    """Every floating-point parameter and buffer through fp16 and back, in place, except those
    whose name ``keep`` accepts."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and not keep(name):
                t.copy_(t.half().float())


def sixteen_bit(model: nn.Module) -> nn.Module:
    """A copy that runs at 16 bits: its weights went through fp16 and back (a quantized layer
    keeps its weights and scales: only its bias, FP16 in the rules), and so does its input and
    every module's output (activation-function modules, each block and SE block with its residual
    addition or gate product, each conv / linear output), emulating fp16 arithmetic with an fp32
    accumulator inside a conv or matrix product. Operations inside a module's forward (the SE
    block's pooling and sigmoid) are rounded where that module returns."""
    clone = copy.deepcopy(model)
    integer = [name for name, m in clone.named_modules() if integer_weights(m)]
    biases, kept = {f"{n}.bias" for n in integer}, tuple(f"{n}." for n in integer)
    round_to_fp16(clone, keep=lambda name: name.startswith(kept) and name not in biases)
    # A Brevitas layer's quantizers pass QuantTensors between them: rounded where the layer returns.
    inside = tuple(f"{n}." for n, m in clone.named_modules() if hasattr(m, "weight_quant"))
    clone.register_forward_pre_hook(lambda _m, args: _to_fp16(args))
    for name, m in clone.named_modules():
        # A Sequential returns its last module's output, already rounded: no hook (it would not change it).
        if not isinstance(m, nn.Sequential) and not (inside and name.startswith(inside)):
            m.register_forward_hook(lambda _m, _args, out: _to_fp16(out))
    return clone


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, mean, std, *, batch_size: int = 500, device=None,
            fp16: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Logits (float32, on the CPU) of a uint8 image tensor, in evaluation mode (``fp16``: run at 16 bits)."""
    device = device or next(model.parameters()).device
    net = sixteen_bit(model) if fp16 else model
    was_training = net.training
    net.eval()
    mean_t, std_t = channel_stats_tensor(mean, device), channel_stats_tensor(std, device)
    outs = []
    for chunk in x.split(batch_size):
        xb = normalize(chunk.to(device, non_blocking=True), mean_t, std_t, channels_last)
        outs.append(net(xb).float().cpu())
    net.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` (or of predicted labels, 1-D) against ``y``; NaN when empty."""
    if len(y) == 0:
        return float("nan")
    pred = logits.argmax(1) if logits.dim() == 2 else logits
    return float((pred == y.cpu()).float().mean())


def evaluate(model: nn.Module, data: PreparedData, split: str = "test", *, fp16: bool = False,
             batch_size: int = 500) -> float:
    """Top-1 accuracy on a split (``fp16``: of the network run at 16 bits)."""
    x, y = data.split(split)
    if len(y) == 0:
        return float("nan")
    return accuracy(predict(model, x, data.mean, data.std, batch_size=batch_size, fp16=fp16), y)


@dataclass(frozen=True)
class SplitReader:
    """The labels of a prepared data set's splits and a model's logits on them, as a stage reads
    them (one batch size; ``fp16``: the network run at 16 bits, as counted under the freebie)."""

    data: PreparedData
    batch_size: int

    def labels(self, split: str) -> torch.Tensor:
        return self.data.split(split)[1]

    def logits(self, model: nn.Module, split: str, fp16: bool = False) -> torch.Tensor:
        x, _ = self.data.split(split)
        return predict(model, x, self.data.mean, self.data.std, batch_size=self.batch_size, fp16=fp16)
