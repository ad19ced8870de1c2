"""Quantization-aware training of the accelerated network (beyond the paper).

A run starts from the floating-point input network (with its exit where one
was kept): the quantizer of every layer's input is fitted once from the
float network's ranges on a few training batches (``quantizers.py``). At
each set of widths, a copy of the network has its BatchNorm folded and its
conv and linear layers replaced by Brevitas layers (``qat.py``), the pruning
masks kept (sparsity cannot change); the main network trains through the
width schedule (straight-through gradients), then the exit on the frozen
quantized main network with its own loss and one-hot targets. Every training
is resumable under the stage's state folder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sipa_core.accelerate.exits import LOSS_FUNCTIONS, EarlyExitNetwork
from sipa_core.accelerate.record import ExitRecord, float_exit_network
from sipa_core.accelerate.training import exit_train_mode
from sipa_core.lineage import Lineage
from sipa_core.prune.masks import apply_masks, masks_from_zeros
from sipa_core.quantize.qat import calibrate, fold_batchnorm, quantize_modules
from sipa_core.quantize.quantizers import Quantizers, fitted_quantizers, init_weight_scales, is_quantizer_parameter
from sipa_core.quantize.relus import fusable_relus, why_not_fused
from sipa_core.scoring.bits import BitWidths
from sipa_core.train import fit
from sipa_core.train.evaluation import SplitReader, normalized

# Quantization-aware fine-tuning: a short low-lr cosine run from the trained weights, no mixing.
QAT_RECIPE = {"lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-5, "no_bias_decay": True,
              "batch_size": 128, "schedule": "cosine", "warmup_epochs": 0, "label_smoothing": 0.1,
              "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "ghost_batch": 0, "augment": "none"}


@dataclass
class QuantRun:
    """One quantize run: the float input network (main, and its exit record), the splits, the
    recipe, the lineage, the key of kept work, and the quantizers fitted from the float input."""

    cfg: dict
    splits: SplitReader
    main: torch.nn.Module
    exit_record: ExitRecord | None
    recipe: dict
    lineage: Lineage
    key: dict
    params_file: str
    progress: bool | None = None
    quantizers: Quantizers | None = None  # the main network's input quantizers
    exit_quantizers: Quantizers | None = None

    @property
    def data(self):
        return self.splits.data

    def batches(self) -> list[torch.Tensor]:
        """Calibration batches: training images, normalised, no augmentation."""
        x = self.data.split("train")[0]
        bs = self.recipe["batch_size"]
        return [normalized(x[i * bs:(i + 1) * bs], self.data.mean, self.data.std)
                for i in range(min(self.cfg["calibration_batches"], max(1, len(x) // bs)))]

    def own_lr(self):
        """The quantizers' scales and zero points at ``scale_lr`` without decay (None: as any parameter)."""
        return (is_quantizer_parameter, self.cfg["scale_lr"]) if self.cfg["scale_lr"] is not None else None

    def float_exit_net(self) -> EarlyExitNetwork:
        """The floating-point input network with its exit (wraps ``main``, changes nothing)."""
        return float_exit_network(self.main, self.exit_record, self.cfg["model"])

    def fit_quantizers(self) -> None:
        """Each layer's input quantizer, from the float input network's ranges on the calibration batches,
        and the ReLUs that take their layer's output quantizer (``fuse_relu``)."""
        act, scale, outputs = self.cfg["act_quantizers"], self.cfg["weight_scale"], self.cfg["output_bits"]
        self.quantizers = self._with_relus(fitted_quantizers(self.main, self.batches(), act, scale, outputs=outputs),
                                           self.main)
        if self.exit_record is not None:
            net = self.float_exit_net()
            self.exit_quantizers = self._with_relus(
                fitted_quantizers(net, self.batches(), act, scale, part=net.exit, outputs=outputs), net.exit)

    def _with_relus(self, quantizers: Quantizers, module: torch.nn.Module) -> Quantizers:
        if not self.cfg["fuse_relu"] or why_not_fused(self.cfg):
            return quantizers
        return replace(quantizers, relus=fusable_relus(module))

    def exit_widths(self, widths: BitWidths) -> BitWidths:
        """The exit's widths: the defaults without per-layer overrides, its own unsigned inputs."""
        return replace(widths.without_overrides(), unsigned=self.exit_quantizers.unsigned())


def quantized_copy(module: torch.nn.Module, widths: BitWidths, quantizers: Quantizers):
    """Fold BatchNorm into a copy of ``module``, quantize it; (copy, its masks: the zeros kept)."""
    q = copy.deepcopy(module).cpu().eval()
    fold_batchnorm(q)
    masks = masks_from_zeros(q)
    quantize_modules(q, widths, quantizers)
    return q, masks


def schedule_steps(cfg: dict, widths: BitWidths) -> list[BitWidths]:
    """The widths QAT steps through: each schedule width that is above the final widths (as a floor
    under every layer's weights and activations), then the final widths."""
    steps = []
    for bits in cfg["schedule"]:
        overrides = tuple((p, max(bits, w), max(bits, a)) for p, w, a in widths.overrides)
        step = replace(widths, weight=max(bits, widths.weight), act=max(bits, widths.act), overrides=overrides)
        if step != widths and (not steps or step != steps[-1]):
            steps.append(step)
    return steps + [widths]


def _float_weights(model: torch.nn.Module) -> dict:
    """A quantized network's float weights and biases (not its quantizers' scales)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".weight", ".bias"))}


def train_main(run: QuantRun, widths: BitWidths, run_dir: Path) -> torch.nn.Module:
    """The quantized main network: for each step of the width schedule, the previous step's weights
    quantized at the step's widths, activation scales calibrated, then QAT with the masks kept."""
    steps, weights = schedule_steps(run.cfg, widths), None
    for i, step in enumerate(steps):
        main, masks = quantized_copy(run.main, step, run.quantizers)
        if weights is not None:
            main.load_state_dict(weights, strict=False)
        calibrate(main, run.batches())
        init_weight_scales(main)
        last = i == len(steps) - 1
        step_recipe = {**run.recipe, "epochs": run.cfg["epochs"]} if last else \
            {**run.recipe, "epochs": run.cfg["schedule_epochs"], "stabilize_epochs": 0}
        label = f"W{step.weight}A{step.act}"
        if step_recipe["epochs"] > 0:
            fit(main, run.data, step_recipe, state_path=run_dir / ("main.pt" if last else f"main-{label}.pt"),
                tag=f"quantize-main-{label}", desc=f"QAT {label}", train_splits=tuple(run.lineage.splits),
                val_split="val" if len(run.data.val_y) else None, after_step=lambda m, k=masks: apply_masks(m, k),
                progress=run.progress, own_lr=run.own_lr(),
                teacher=copy.deepcopy(run.main) if run.recipe["distill_weight"] else None)
        weights = _float_weights(main)
    return main.cpu().eval()


def train_exit(run: QuantRun, main: torch.nn.Module, widths: BitWidths, run_dir: Path) -> EarlyExitNetwork:
    """The quantized exit on the frozen quantized main network (its own loss, one-hot targets)."""
    float_net = run.float_exit_net()
    qexit, masks = quantized_copy(float_net.exit, run.exit_widths(widths), run.exit_quantizers)
    net = EarlyExitNetwork(main, float_net.exit_cfg, qexit)
    for p in main.parameters():
        p.requires_grad_(False)
    calibrate(net, run.batches(), part=net.exit)
    init_weight_scales(net.exit)
    if run.cfg["exit_epochs"] > 0:
        fit(net, run.data, {**run.recipe, "epochs": run.cfg["exit_epochs"], "label_smoothing": 0.0},
            state_path=run_dir / "exit.pt", tag=f"quantize-exit-{widths.label()}", desc=f"QAT exit {widths.label()}",
            params=list(net.exit.parameters()), loss_fn=LOSS_FUNCTIONS[run.exit_record.loss],
            train_mode=exit_train_mode(), train_splits=tuple(run.lineage.splits), val_split="val",
            after_step=lambda m: apply_masks(m.exit, masks), progress=run.progress, own_lr=run.own_lr(),
            teacher=copy.deepcopy(float_net) if run.recipe["distill_weight"] else None)
    return net.cpu().eval()
