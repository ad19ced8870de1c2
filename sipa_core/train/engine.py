"""The one training engine every stage uses (search trials, improving,
pruning fine-tunes, exit training).

``fit`` trains a model on a prepared data set with a recipe. The data set
lives on the training device as uint8 tensors; batches are drawn, augmented,
normalised and mixed there. At every epoch end the whole training state
(model, optimizer, scheduler, scaler, epoch, RNG states, history) is saved
atomically (``train.state``), so a killed run started again continues from
its last epoch and ends with the same weights as an uninterrupted run
(deterministic CPU mode). The layout follows torchvision's classification
reference: building the run, ``train_one_epoch``, and the loop in ``fit``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sipa_core.data.prepared import PreparedData
from sipa_core.distributed import RunningStats, all_mean, rank_and_world
from sipa_core.errors import SipaError
from sipa_core.faults import fault_point
from sipa_core.runtime import record_teacher, record_training, resolve_device
from sipa_core.train.augment import cutmix, make_policy, mixup, normalize, random_crop, random_flip, soft_targets
from sipa_core.train.evaluation import channel_stats_tensor, evaluate
from sipa_core.train.optim import build_optimizer
from sipa_core.train.state import fingerprint, load_model_state, read_state, restore_run, save_state


class TrainingDiverged(SipaError):
    """The loss became NaN or infinite; the last good state is kept."""


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor | None = None):
    """Cross-entropy against soft targets (one-hot, smoothed or mixed)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(teacher || student) of the logits softened at temperature T (Hinton et al.), per image."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean",
                    log_target=True) * t * t


@dataclass
class FitResult:
    history: list[dict]
    val_acc: float | None
    epochs: int
    resumed_from: int  # epochs already done when this call started
    seconds: float
    images_per_sec: float
    extra: dict = field(default_factory=dict)


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed torch's global RNG and pick deterministic kernels (or fast ones)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.manual_seed(seed)


@dataclass
class TrainingRun:
    """What one call of ``fit`` trains with: model and its wrappers, data on the
    device, optimizer, schedule, scaler and the data RNG."""

    recipe: dict
    model: nn.Module
    step_fn: nn.Module  # the model as the step calls it (DDP / torch.compile wrapped)
    device: torch.device
    x_train: torch.Tensor
    y_train: torch.Tensor
    steps_per_epoch: int
    local: slice  # this process's part of each global batch
    rank: int
    world: int
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    gen: torch.Generator
    policy: Callable | None  # policy(uint8 batch, generator)
    mean_t: torch.Tensor
    std_t: torch.Tensor
    num_classes: int
    loss_fn: Callable
    after_step: Callable | None
    fingerprint: str = ""
    teacher: nn.Module | None = None  # distillation: frozen, in eval mode, on the device
    running_stats: RunningStats | None = None  # several processes: BatchNorm statistics kept as one process's

    @property
    def images_per_epoch(self) -> int:
        """Images one epoch trains on (full global batches; the last partial one is dropped)."""
        return self.steps_per_epoch * self.recipe["batch_size"]

    @property
    def amp_dtype(self):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.recipe["precision"])


def _training_tensors(data: PreparedData, train_splits, device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([data.split(s)[0] for s in train_splits]).to(device)
    y = torch.cat([data.split(s)[1] for s in train_splits]).to(device)
    if len(y) == 0:
        raise SipaError("training split is empty: nothing to train on")
    return x, y


def _teacher_on(teacher: nn.Module | None, recipe: dict, device) -> nn.Module | None:
    """The teacher, frozen on the device, when the recipe distils; a distillation weight with no
    teacher is an error (the stage must give one)."""
    if not recipe["distill_weight"]:
        return None
    if teacher is None:
        raise SipaError("recipe.distill_weight: distillation needs a teacher, and this training has none")
    teacher = teacher.to(device).eval()
    if recipe["channels_last"]:
        teacher.to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def build_run(model: nn.Module, data: PreparedData, recipe: dict, *, train_splits=("train",), params=None,
              loss_fn: Callable | None = None, after_step=None, tag: str = "",
              teacher: nn.Module | None = None, own_lr=None) -> TrainingRun:
    """Device, determinism, data on the device, optimizer and wrappers, in that order."""
    device = resolve_device(recipe["device"])
    set_determinism(recipe["seed"], recipe["deterministic"])
    if recipe["precision"] != "fp32" and not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise SipaError(f"recipe.precision: {recipe['precision']} autocast is not available on {device}")
    model.to(device)
    if recipe["channels_last"]:
        model.to(memory_format=torch.channels_last)
    x_train, y_train = _training_tensors(data, train_splits, device)
    bs = recipe["batch_size"]
    rank, world = rank_and_world()
    if bs % world:
        raise SipaError(f"recipe.batch_size: {bs} is not divisible by the {world} data-parallel processes")
    steps_per_epoch = max(1, len(y_train) // bs)  # drop the last partial batch (BatchNorm needs >1 image)
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt, sched, scaler = build_optimizer(model, params, recipe, steps_per_epoch, device.type, own_lr)
    gen = torch.Generator().manual_seed(recipe["seed"])
    policy = make_policy(recipe["augment"], recipe["augment_group"])
    step_fn = model
    if world > 1:
        step_fn = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if recipe["compile"]:
        step_fn = torch.compile(step_fn, mode=None if recipe["compile_mode"] == "default" else recipe["compile_mode"])
    run = TrainingRun(recipe, model, step_fn, device, x_train, y_train, steps_per_epoch,
                      slice(rank * bs // world, (rank + 1) * bs // world), rank, world, opt, sched, scaler, gen,
                      policy, channel_stats_tensor(data.mean, device), channel_stats_tensor(data.std, device),
                      data.num_classes, loss_fn or soft_cross_entropy, after_step)
    run.fingerprint = fingerprint(model, data, recipe, tag)
    run.teacher = _teacher_on(teacher, recipe, device)
    run.running_stats = RunningStats(model, bs // world) if world > 1 else None
    return run


def _batch(run: TrainingRun, idx: torch.Tensor, stabilizing: bool):
    """One global batch: policy, crop, flip, normalise, soft targets, mixing; then this process's slice."""
    recipe, gen = run.recipe, run.gen
    xb, yb = run.x_train[idx], run.y_train[idx]
    if run.policy is not None and not stabilizing:
        xb = run.policy(xb, gen)
    xb = random_crop(xb, recipe["crop_padding"], gen)
    if recipe["flip"]:
        xb = random_flip(xb, gen)
    xf = normalize(xb, run.mean_t, run.std_t, recipe["channels_last"])
    targets = soft_targets(yb, run.num_classes, 0.0 if stabilizing else recipe["label_smoothing"])
    if not stabilizing:
        xf, targets = _mix(xf, targets, recipe, gen)
    if run.world > 1:  # the same global batch on every process; each trains on its slice
        xf, targets, yb = xf[run.local], targets[run.local], yb[run.local]
    return xf, targets, yb


def train_one_epoch(run: TrainingRun, epoch: int, *, state_path: Path | None, quiet: bool | None) -> dict:
    """One pass over the training tensors; returns the epoch's row (lr, loss, images/s)."""
    stabilizing = epoch >= run.recipe["epochs"]
    bs, device = run.recipe["batch_size"], run.device
    perm = torch.randperm(len(run.y_train), generator=run.gen).to(device)
    loss_sum = torch.zeros((), device=device)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    t0 = time.perf_counter()
    for step in tqdm(range(run.steps_per_epoch), desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                     disable=quiet):
        xf, targets, yb = _batch(run, perm[step * bs:(step + 1) * bs], stabilizing)
        if run.running_stats is not None:
            run.running_stats.before_step()
        with torch.autocast(device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
            logits = run.step_fn(xf)
        loss = run.loss_fn(logits.float(), targets, yb)
        if run.teacher is not None:
            loss = _distilled(run, loss, logits.float(), xf)
        # First non-finite step, tracked on the device: no host sync per step on a GPU.
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)
        if device.type == "cpu" and bad_step >= 0:
            _diverged(loss, epoch, bad_step, state_path)
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
        if run.running_stats is not None:
            run.running_stats.after_step()
        lr_used = run.opt.param_groups[0]["lr"]
        run.sched.step()
        if run.after_step is not None:
            run.after_step(run.model)
        fault_point("step")
        loss_sum += loss.detach()
    if bad_step >= 0:  # one sync per epoch
        _diverged(loss_sum, epoch, bad_step, state_path)
    loss_sum = all_mean(loss_sum)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    record_training(run.images_per_epoch)
    if run.teacher is not None:
        record_teacher(run.images_per_epoch)
    return {"epoch": epoch + 1, "lr": lr_used, "train_loss": float(loss_sum) / run.steps_per_epoch,
            "images_per_sec": run.images_per_epoch / seconds if seconds > 0 else 0.0}


class _Live:
    """DVCLive logging of per-epoch metrics; replayed from history on resume so
    the curves stay whole however often the run was interrupted."""

    def __init__(self, directory: str | None, history: list[dict]):
        self.live = None
        if directory is None:
            return
        from dvclive import Live  # noqa: PLC0415 -- heavy (about 3 s), and only when logging

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
        progress: bool | None = None, teacher: nn.Module | None = None,
        own_lr: tuple[Callable[[str], bool], float] | None = None) -> FitResult:
    """Train ``model`` in place with ``recipe``; resumes from ``state_path`` if it holds this run.

    ``params``: the parameters to optimise (default: all); ``loss_fn(logits,
    soft_targets, labels)``; ``after_step(model)`` runs after every optimizer
    step (pruning masks); ``train_mode(model)`` puts the model in training
    mode (default ``model.train()``; exit training keeps a frozen part in eval); ``teacher``: the
    network distilled from when ``recipe['distill_weight']`` > 0 (frozen, eval mode, no gradients);
    ``own_lr``: (which parameter names, learning rate) trained at their own rate without weight decay.
    """
    started = time.perf_counter()
    state_path = Path(state_path) if state_path else None
    params = list(params) if params is not None else None
    state = read_state(state_path, fingerprint(model, data, recipe, tag))
    if state is not None:  # the weights first: the optimizer and any wrapper then take the loaded parameters
        params = load_model_state(model, state["model"], params)
    run = build_run(model, data, recipe, train_splits=train_splits, params=params, loss_fn=loss_fn,
                    after_step=after_step, tag=tag, teacher=teacher, own_lr=own_lr)
    total_epochs = recipe["epochs"] + recipe["stabilize_epochs"]
    start_epoch, history = restore_run(state, run, desc, total_epochs)
    if start_epoch:  # epochs an earlier process trained count toward what this result cost
        record_training(start_epoch * run.images_per_epoch, epochs=start_epoch)
        if run.teacher is not None:
            record_teacher(start_epoch * run.images_per_epoch)
    if hasattr(after_step, "begin"):  # a step-aware hook (gradual pruning) learns where the run starts
        after_step.begin(model, start_epoch * run.steps_per_epoch, run.steps_per_epoch)
    live = _Live(live_dir if run.rank == 0 else None, history)  # one writer: rank 0
    quiet = None if progress is None else not progress  # None: tqdm shows bars only on a terminal
    if run.rank != 0:
        quiet = True
    bar = tqdm(range(start_epoch, total_epochs), desc=desc, unit="epoch", disable=quiet, initial=start_epoch,
               total=total_epochs, leave=False)
    for epoch in bar:
        (train_mode or (lambda m: m.train()))(model)
        row = train_one_epoch(run, epoch, state_path=state_path, quiet=quiet)
        if val_split is not None and len(data.split(val_split)[1]):
            row["val_acc"] = evaluate(model, data, val_split, batch_size=recipe["eval_batch_size"])
        history.append(row)
        save_state(state_path, run, epoch + 1, history)
        fault_point("epoch")
        live.log(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row.get('val_acc', float('nan')):.3f}")
    live.end()
    model.eval()
    done = [r for r in history if r["epoch"] > start_epoch]
    ips = (sum(r["images_per_sec"] for r in done) / len(done)) if done else 0.0
    val = history[-1].get("val_acc") if history else None
    return FitResult(history, val, total_epochs, start_epoch, time.perf_counter() - started, ips)


def _distilled(run: TrainingRun, task_loss: torch.Tensor, logits: torch.Tensor, xf: torch.Tensor) -> torch.Tensor:
    """The task loss mixed with distillation from the teacher's logits on the same batch."""
    w, t = run.recipe["distill_weight"], run.recipe["distill_temperature"]
    with torch.no_grad(), torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32,
                                         enabled=run.amp_dtype is not None):
        teacher_logits = run.teacher(xf)
    return (1 - w) * task_loss + w * distillation_loss(logits, teacher_logits.float(), t)


def _diverged(loss, epoch, step, state_path):
    where = f"the last good state is {state_path} (epoch {epoch})" if state_path else "no state was saved"
    raise TrainingDiverged(f"training diverged: loss is {float(loss.detach())} at epoch {epoch + 1}, "
                           f"step {int(step) + 1}; {where}; lower the learning rate or check the data")


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
