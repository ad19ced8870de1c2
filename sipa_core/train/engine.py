"""The one training engine every stage uses (search trials, improving,
pruning fine-tunes, exit training).

``fit`` trains a model on a prepared data set with a recipe. The data set
lives on the training device as uint8 tensors; batches are drawn, augmented,
normalised and mixed there. At every epoch end the whole training state
(model, optimizer, scheduler, scaler, epoch, RNG states, history) is saved
atomically, so a killed run started again continues from its last epoch and
ends with the same weights as an uninterrupted run (deterministic CPU mode).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sipa_core.data.prepare import PreparedData
from sipa_core.distributed import all_mean, rank_and_world
from sipa_core.errors import SipaError
from sipa_core.faults import fault_point
from sipa_core.io import atomic_torch_save, load_checkpoint
from sipa_core.train.augment import (PolicyAugment, cutmix, mixup, normalize, random_crop, random_flip,
                                     soft_targets)

STATE_FORMAT = "sipa-train-state"


class TrainingDiverged(SipaError):
    """The loss became NaN or infinite; the last good state is kept."""


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor | None = None):
    """Cross-entropy against soft targets (one-hot, smoothed or mixed)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


@dataclass
class FitResult:
    history: list[dict]
    val_acc: float | None
    epochs: int
    resumed_from: int  # epochs already done when this call started
    seconds: float
    images_per_sec: float
    extra: dict = field(default_factory=dict)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":  # under torchrun, each process its own GPU
        from sipa_core.distributed import local_rank

        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SipaError(f"recipe.device: unknown device {name!r} (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SipaError(f"recipe.device: {name} asked for, but no CUDA device is available")
    return device


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed torch's global RNG and pick deterministic kernels (or fast ones)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.manual_seed(seed)


def param_groups(model: nn.Module, params, weight_decay: float, no_bias_decay: bool, no_bn_decay: bool):
    """Optimizer groups: decayed, and (optionally) biases / BatchNorm parameters without decay."""
    wanted = {id(p) for p in params}
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) not in wanted or not p.requires_grad:
            continue
        is_bn = id(p) in bn_params
        if (no_bn_decay and is_bn) or (no_bias_decay and name.endswith("bias")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def lr_factor(step: int, recipe: dict, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at an optimizer step."""
    main = recipe["epochs"] * steps_per_epoch
    if step >= main:  # distribution stabilisation: a small constant rate
        return recipe["stabilize_lr"] / recipe["lr"]
    warm = recipe["warmup_epochs"] * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if recipe["schedule"] == "cosine":
        t = (step - warm) / max(1, main - warm)
        floor = recipe["lr_min"] / recipe["lr"]
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if recipe["schedule"] == "step":
        return recipe["step_gamma"] ** ((step // steps_per_epoch) // recipe["step_every"])
    return 1.0


def _stats(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def half_weights(model: nn.Module) -> nn.Module:
    """A copy whose weights went through fp16 and back: the 16-bit freebie's accuracy."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(clone.parameters()) + list(clone.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return clone


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, mean, std, *, batch_size: int = 500, device=None,
            fp16_weights: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Logits (float32, on the CPU) of a uint8 image tensor, in evaluation mode."""
    device = device or next(model.parameters()).device
    net = half_weights(model) if fp16_weights else model
    was_training = net.training
    net.eval()
    mean_t, std_t = _stats(mean, device), _stats(std, device)
    outs = []
    for chunk in x.split(batch_size):
        xb = normalize(chunk.to(device, non_blocking=True), mean_t, std_t, channels_last)
        outs.append(net(xb).float().cpu())
    net.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y.cpu()).float().mean()) if len(y) else float("nan")


def evaluate(model: nn.Module, data: PreparedData, split: str = "test", *, fp16_weights: bool = False,
             batch_size: int = 500) -> float:
    """Top-1 accuracy on a split (``fp16_weights``: of the 16-bit weights)."""
    x, y = data.split(split)
    if len(y) == 0:
        return float("nan")
    return accuracy(predict(model, x, data.mean, data.std, batch_size=batch_size, fp16_weights=fp16_weights), y)


def fingerprint(model: nn.Module, data: PreparedData, recipe: dict, tag: str = "") -> str:
    """Identity of a training run: resuming is only allowed into the same run."""
    blob = json.dumps({"recipe": recipe, "spec": getattr(model, "spec", None), "source": data.source,
                       "n": int(data.train_y.numel()), "tag": tag,
                       "shapes": [list(p.shape) for p in model.parameters()]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Live:
    """DVCLive logging of per-epoch metrics; replayed from history on resume so
    the curves stay whole however often the run was interrupted."""

    def __init__(self, directory: str | None, history: list[dict]):
        self.live = None
        if directory is None:
            return
        from dvclive import Live

        self.live = Live(dir=str(directory), resume=False, save_dvc_exp=False, dvcyaml=None)
        for row in history:
            self.log(row)

    def log(self, row: dict):
        if self.live is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and value == value:
                self.live.log_metric(key, value)
        self.live.next_step()

    def end(self):
        if self.live is not None:
            self.live.end()


def fit(model: nn.Module, data: PreparedData, recipe: dict, *, state_path: str | os.PathLike | None = None,
        live_dir: str | os.PathLike | None = None, train_splits=("train",), val_split: str | None = "val",
        params=None, loss_fn: Callable | None = None, after_step: Callable[[nn.Module], None] | None = None,
        train_mode: Callable[[nn.Module], None] | None = None, tag: str = "", desc: str = "train",
        progress: bool | None = None) -> FitResult:
    """Train ``model`` in place with ``recipe``; resumes from ``state_path`` if it holds this run.

    ``params``: the parameters to optimise (default: all); ``loss_fn(logits,
    soft_targets, labels)``; ``after_step(model)`` runs after every optimizer
    step (pruning masks); ``train_mode(model)`` puts the model in training
    mode (default ``model.train()``; exit training keeps a frozen part in eval).
    """
    started = time.perf_counter()
    device = resolve_device(recipe["device"])
    set_determinism(recipe["seed"], recipe["deterministic"])
    if recipe["precision"] != "fp32" and not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise SipaError(f"recipe.precision: {recipe['precision']} autocast is not available on {device}")
    model.to(device)
    if recipe["channels_last"]:
        model.to(memory_format=torch.channels_last)
    x_train = torch.cat([data.split(s)[0] for s in train_splits]).to(device)
    y_train = torch.cat([data.split(s)[1] for s in train_splits]).to(device)
    n, bs = len(y_train), recipe["batch_size"]
    if n == 0:
        raise SipaError("training split is empty: nothing to train on")
    rank, world = rank_and_world()
    if bs % world:
        raise SipaError(f"recipe.batch_size: {bs} is not divisible by the {world} data-parallel processes")
    local = slice(rank * bs // world, (rank + 1) * bs // world)  # this process's part of each global batch
    steps_per_epoch = max(1, n // bs)  # drop the last partial batch (BatchNorm needs >1 image)
    mean_t, std_t = _stats(data.mean, device), _stats(data.std, device)
    num_classes = data.num_classes
    loss_fn = loss_fn or soft_cross_entropy

    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, params, recipe["weight_decay"], recipe["no_bias_decay"], recipe["no_bn_decay"])
    opt = torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe["momentum"], nesterov=recipe["nesterov"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, recipe, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=recipe["precision"] == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe["precision"])
    gen = torch.Generator().manual_seed(recipe["seed"])
    policy = PolicyAugment(recipe["augment"], recipe["augment_group"]) if recipe["augment"] != "none" else None
    total_epochs = recipe["epochs"] + recipe["stabilize_epochs"]
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = net
    if recipe["compile"]:
        step_fn = torch.compile(net)

    fp = fingerprint(model, data, recipe, tag)
    start_epoch, history = 0, []
    state_path = Path(state_path) if state_path else None
    if state_path is not None and state_path.exists():
        state = load_checkpoint(state_path, "training state")
        if isinstance(state, dict) and state.get("format") == STATE_FORMAT and state.get("fingerprint") == fp:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng_cpu"])
            gen.set_state(state["rng_data"])
            if device.type == "cuda" and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            start_epoch, history = int(state["epoch"]), list(state["history"])
    resumed_from = start_epoch
    if start_epoch and rank == 0:
        import sys

        print(f"{desc}: resuming after epoch {start_epoch}/{total_epochs} from {state_path}", file=sys.stderr)
    live = _Live(live_dir, history)

    def save_state(epoch: int):
        if state_path is None or rank != 0:
            return
        atomic_torch_save(state_path, {
            "format": STATE_FORMAT, "fingerprint": fp, "epoch": epoch, "history": history,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state(), "rng_data": gen.get_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        })

    quiet = None if progress is None else not progress  # None: tqdm shows bars only on a terminal
    if rank != 0:
        quiet = True
    epochs_bar = tqdm(range(start_epoch, total_epochs), desc=desc, unit="epoch", disable=quiet,
                      initial=start_epoch, total=total_epochs, leave=False)
    for epoch in epochs_bar:
        stabilizing = epoch >= recipe["epochs"]
        (train_mode or (lambda m: m.train()))(model)
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        t0 = time.perf_counter()
        for step in tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                         disable=quiet):
            idx = perm[step * bs:(step + 1) * bs]
            xb, yb = x_train[idx], y_train[idx]
            if policy is not None and not stabilizing:
                xb = policy(xb)
            xb = random_crop(xb, recipe["crop_padding"], gen)
            if recipe["flip"]:
                xb = random_flip(xb, gen)
            xf = normalize(xb, mean_t, std_t, recipe["channels_last"])
            targets = soft_targets(yb, num_classes, 0.0 if stabilizing else recipe["label_smoothing"])
            if not stabilizing:
                xf, targets = _mix(xf, targets, recipe, gen)
            if world > 1:  # the same global batch on every process; each trains on its slice
                xf, targets, yb = xf[local], targets[local], yb[local]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = step_fn(xf)
            loss = loss_fn(logits.float(), targets, yb)
            # First non-finite step, tracked on the device: no host sync per step on a GPU.
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)
            if device.type == "cpu" and bad_step >= 0:
                _diverged(loss, epoch, bad_step, state_path)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            lr_used = opt.param_groups[0]["lr"]
            sched.step()
            if after_step is not None:
                after_step(model)
            fault_point("step")
            loss_sum += loss.detach()
        if bad_step >= 0:  # one sync per epoch
            _diverged(loss_sum, epoch, bad_step, state_path)
        loss_sum = all_mean(loss_sum)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "lr": lr_used,
               "train_loss": float(loss_sum) / steps_per_epoch,
               "images_per_sec": steps_per_epoch * bs / seconds if seconds > 0 else 0.0}
        if val_split is not None and len(data.split(val_split)[1]):
            row["val_acc"] = evaluate(model, data, val_split, batch_size=recipe["eval_batch_size"])
        history.append(row)
        save_state(epoch + 1)
        fault_point("epoch")
        live.log(row)
        epochs_bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row.get('val_acc', float('nan')):.3f}")
    live.end()
    model.eval()
    done = [r for r in history if r["epoch"] > resumed_from]
    ips = (sum(r["images_per_sec"] for r in done) / len(done)) if done else 0.0
    val = history[-1].get("val_acc") if history else None
    return FitResult(history, val, total_epochs, resumed_from, time.perf_counter() - started, ips)


def _diverged(loss, epoch, step, state_path):
    where = f"the last good state is {state_path} (epoch {epoch})" if state_path else "no state was saved"
    raise TrainingDiverged(f"training diverged: loss is {float(loss.detach())} at epoch {epoch + 1}, step {int(step) + 1}; "
                    f"{where}; lower the learning rate or check the data")


def _mix(x, targets, recipe, gen):
    use_mixup, use_cutmix = recipe["mixup_alpha"] > 0, recipe["cutmix_alpha"] > 0
    if use_mixup and use_cutmix:  # one of the two per batch, by a fair coin
        if torch.rand((), generator=gen) < 0.5:
            use_mixup = False
        else:
            use_cutmix = False
    if use_mixup:
        return mixup(x, targets, recipe["mixup_alpha"], gen)
    if use_cutmix:
        return cutmix(x, targets, recipe["cutmix_alpha"], gen)
    return x, targets
