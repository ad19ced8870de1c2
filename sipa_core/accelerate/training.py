"""Exit training (SIPA section 2.4, Appendix A.4): the exit's own recipe, an exit trained on
the frozen main network at one position, optionally pruned in rounds and stabilised, and
its validation and test logits kept, so a stage started again trains nothing twice.

The exit's recipe follows the authors' code (their public repository,
Lee-Gihun/MicroNet_OSI-AI): softsmoothing on one-hot targets, no mixup or
CutMix, SGD lr 0.13, weight decay 1e-5 without bias decay, cosine annealing,
whatever the main network trained with. With the main network's 0.3-smoothed
targets over 100 classes the loss's optimum confidence stays below every
threshold, so nothing would exit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sipa_core.accelerate.exits import LOSS_FUNCTIONS, EarlyExitNetwork, ExitCost, exit_config
from sipa_core.faults import fault_point
from sipa_core.lineage import Lineage
from sipa_core.prune.masks import apply_masks, full_masks, magnitude_masks
from sipa_core.resume import keep, load_kept, run_key
from sipa_core.train import fit, predict, sixteen_bit
from sipa_core.train.evaluation import SplitReader
from sipa_core.train.recipe import check_recipe, speed_settings

LOGITS_FORMAT = "sipa-exit-logits"
EXIT_RECIPE = {"lr": 0.13, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-5, "no_bias_decay": True,
               "batch_size": 128, "schedule": "cosine", "warmup_epochs": 0, "label_smoothing": 0.0,
               "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "ghost_batch": 0, "augment": "none"}


def exit_recipe(cfg: dict, input_recipe: dict | None, params_file: str) -> dict:
    """The exit's training recipe: ``EXIT_RECIPE`` (one-hot targets, no mixing), the input
    checkpoint's speed settings only, then ``accelerate.recipe``."""
    return check_recipe({**EXIT_RECIPE, **speed_settings(input_recipe), **cfg["recipe"],
                         "epochs": cfg["epochs"], "seed": cfg["seed"]},
                        file=params_file, section="accelerate.recipe")


def exit_train_mode(update_main_bn: bool = False):
    """The training mode of an exit on a frozen main network: the main network evaluates, the exit
    trains; ``update_main_bn`` (the authors' setting): the main network's BatchNorm statistics move."""
    def train_mode(model) -> None:
        model.eval()
        model.exit.train()
        if update_main_bn:
            for m in model.main.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.train()
    return train_mode


@dataclass
class TrainedExit:
    """One position's trained exit: the network, its kept record (weights and the exit's
    validation and test logits), the main network's logits it is read with, its cost."""

    net: EarlyExitNetwork
    saved: dict
    main_logits: dict
    cost: ExitCost

    @property
    def logits(self) -> dict:
        return {s: self.saved[s] for s in ("val", "test")}


@dataclass
class ExitTrainer:
    """Trains exits on one frozen main network: its cached logits, the exit recipe, the keys of
    kept work (``key_base``: everything that decides an exit's result but its place and loss)."""

    cfg: dict
    splits: SplitReader
    main: torch.nn.Module
    recipe: dict
    key_base: dict
    lineage: Lineage
    progress: bool | None = None
    main_logits: dict = field(default_factory=dict)

    @property
    def fp16(self) -> bool:
        return self.cfg["bits"] == 16

    @property
    def state(self) -> Path:
        return Path(self.cfg["state"])

    def load_main_logits(self) -> None:
        """The main network's validation and test logits, computed once and kept."""
        path = self.state / f"main-{run_key(self.key_base)}.pt"
        cached = load_kept(path, LOGITS_FORMAT, what="cached logits")
        if cached is None:
            cached = keep(path, {s: self.splits.logits(self.main, s, self.fp16) for s in ("val", "test")},
                          LOGITS_FORMAT)
        self.main_logits = {"val": cached["val"], "test": cached["test"]}

    def main_logits_for(self, net) -> dict:
        """With BN updates the main network changed too: its logits come from this exit's run."""
        if not self.cfg["update_main_bn"]:
            return self.main_logits
        return {s: self.splits.logits(net.main, s, self.fp16) for s in ("val", "test")}

    def train_exit(self, position: int, loss: str) -> tuple[EarlyExitNetwork, dict]:
        """Train (or load) the exit at ``position`` with ``loss``; (network, kept record with its logits)."""
        cfg = self.cfg
        ecfg = exit_config(self.main, position, cfg["width"], cfg["kernel"])
        key = run_key({**self.key_base, "exit": ecfg.as_dict(), "loss": loss})
        run_dir = self.state / f"exit{position}-{loss}-{key}"
        torch.manual_seed(cfg["seed"] + position)
        net = EarlyExitNetwork(self.main, ecfg)
        saved = load_kept(run_dir / "result.pt", LOGITS_FORMAT, what="exit result",
                          announce=f"exit after block {position} ({loss})")
        if saved is not None:
            net.exit.load_state_dict(saved["exit"])
            if cfg["update_main_bn"]:
                net.main.load_state_dict(saved["main"])
            return net, saved
        started = time.time()
        self._fit_exit(net, position, loss, run_dir)
        return net, self._keep_exit(net, run_dir, started)

    def _fit_exit(self, net, position: int, loss: str, run_dir: Path) -> None:
        """Exit training on the frozen main network, then (optionally) gradual exit pruning and the
        stabilisation of the exit path (the paper's "pruning and stabilizing" of the early path)."""
        cfg = self.cfg
        common = dict(params=list(net.exit.parameters()), loss_fn=LOSS_FUNCTIONS[loss],
                      train_mode=exit_train_mode(cfg["update_main_bn"]), val_split="val", progress=self.progress,
                      train_splits=tuple(self.lineage.splits))
        fit(net, self.splits.data, self.recipe, state_path=run_dir / "train.pt", tag=f"exit{position}-{loss}",
            desc=f"exit after block {position} ({loss})", **common)
        masks = self._prune_exit(net, common, position, loss, run_dir)
        if cfg["exit_stabilize_epochs"] > 0:
            stable = {**self.recipe, "epochs": 0, "stabilize_epochs": cfg["exit_stabilize_epochs"],
                      "stabilize_lr": cfg["exit_stabilize_lr"]}
            fit(net, self.splits.data, stable, state_path=run_dir / "stabilize.pt",
                tag=f"exit{position}-{loss}-stable", desc=f"exit {position} stabilisation",
                after_step=(lambda m: apply_masks(m.exit, masks)) if masks else None, **common)

    def _prune_exit(self, net, common: dict, position: int, loss: str, run_dir: Path) -> dict:
        """Gradual pruning of the exit module: one round per ``exit_schedule`` target, each retrained
        (resumable per round); returns the final masks ({} when the exit stays dense)."""
        cfg, masks = self.cfg, {}
        for k, target in enumerate(cfg["exit_schedule"], start=1):
            masks = magnitude_masks(net.exit, masks or full_masks(net.exit), target, scope="global", normalize="l2")
            apply_masks(net.exit, masks)
            if cfg["exit_prune_epochs"] > 0:
                fit(net, self.splits.data, {**self.recipe, "epochs": cfg["exit_prune_epochs"]},
                    state_path=run_dir / f"prune_{k:02d}.pt", tag=f"exit{position}-{loss}-pruned-{k}",
                    desc=f"exit {position} pruning round {k}/{len(cfg['exit_schedule'])}",
                    after_step=lambda m, masks=masks: apply_masks(m.exit, masks), **common)
        return masks

    def _keep_exit(self, net, run_dir: Path, started: float) -> dict:
        net.cpu().eval()
        scored = sixteen_bit(net) if self.fp16 else net
        data = self.splits.data
        out = {"exit": net.exit.state_dict(), "exit_cfg": net.exit_cfg.as_dict(),
               "main": net.main.state_dict() if self.cfg["update_main_bn"] else None}
        for split in ("val", "test"):
            out[split] = predict(scored, data.split(split)[0], data.mean, data.std,
                                 batch_size=self.recipe["eval_batch_size"])  # exit logits
        saved = keep(run_dir / "result.pt", out, LOGITS_FORMAT, since=started)
        fault_point("exit")
        return saved
