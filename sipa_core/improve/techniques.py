"""The improving stage's techniques (SIPA section 2.2) in four categories,
from the least to the most sensitive (general training settings, structural,
loss-related, others), and the greedy selection over them."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

from sipa_core.params import Field


CATEGORIES = ("general", "structural", "loss", "others")  # least -> most sensitive (paper, Figure 4)


@dataclass(frozen=True)
class Technique:
    name: str
    category: str
    overrides: Callable[[dict, dict], dict]  # (recipe so far, options) -> recipe changes
    help: str
    final_only: bool = False  # changes the final training only (cannot be judged on validation)


TECHNIQUES: dict[str, Technique] = {t.name: t for t in [
    Technique("cosine", "general", lambda r, o: {"schedule": "cosine"}, "cosine annealing to lr_min"),
    Technique("larger_lr", "general", lambda r, o: {"lr": o["larger_lr"]}, "a larger initial learning rate"),
    Technique("warmup", "general", lambda r, o: {"warmup_epochs": o["warmup_epochs"]}, "linear warmup"),
    Technique("nesterov", "general", lambda r, o: {"nesterov": True}, "Nesterov momentum"),
    Technique("no_bias_decay", "general", lambda r, o: {"no_bias_decay": True}, "no weight decay on biases"),
    Technique("no_bn_decay", "general", lambda r, o: {"no_bn_decay": True}, "no weight decay on BatchNorm"),
    Technique("ghost_bn", "structural", lambda r, o: {"ghost_batch": o["ghost_batch"]}, "ghost BatchNorm"),
    Technique("swish", "structural", lambda r, o: {"activation": "swish"}, "swish activation"),
    Technique("label_smoothing", "loss", lambda r, o: {"label_smoothing": o["label_smoothing"]}, "label smoothing"),
    Technique("mixup", "loss", lambda r, o: {"mixup_alpha": o["mixup_alpha"]}, "mixup, one lambda per batch"),
    Technique("cutmix", "loss", lambda r, o: {"cutmix_alpha": o["cutmix_alpha"]}, "CutMix"),
    Technique("autoaugment", "others", lambda r, o: {"augment": "autoaugment"}, "AutoAugment (CIFAR policy)"),
    Technique("randaugment", "others", lambda r, o: {"augment": "randaugment"}, "RandAugment"),
    Technique("trivialaugment", "others", lambda r, o: {"augment": "trivialaugment"}, "TrivialAugment"),
    Technique("sipa_policy", "others", lambda r, o: {"augment": "sipa_cifar100"},
              "the authors' CIFAR-100 policy (25 sub-policies, one per image)"),
    Technique("stabilize", "others", lambda r, o: {"stabilize_epochs": o["stabilize_epochs"],
                                                   "stabilize_lr": o["stabilize_lr"]},
              "distribution stabilisation: final epochs at a small lr with crop/flip only"),
    Technique("no_validation", "others", lambda r, o: {}, "final training on train + validation", final_only=True),
]}


PAPER_ADOPTED = ["cosine", "larger_lr", "no_bias_decay", "ghost_bn", "swish", "label_smoothing", "mixup",
                 "sipa_policy", "no_validation"]


PAPER_BASE = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-5, "batch_size": 128, "schedule": "constant",
              "activation": "relu", "augment": "none"}


OPTIONS_SCHEMA = {
    "larger_lr": Field(float, 0.13, min=0, min_exclusive=True),
    "warmup_epochs": Field(int, 1, min=1),
    "ghost_batch": Field(int, 32, min=1),
    "label_smoothing": Field(float, 0.3, min=0, max=1, max_exclusive=True),
    "mixup_alpha": Field(float, 1.0, min=0, min_exclusive=True),
    "cutmix_alpha": Field(float, 1.0, min=0, min_exclusive=True),
    "stabilize_epochs": Field(int, 1, min=1),
    "stabilize_lr": Field(float, 0.001, min=0, min_exclusive=True),
}


def _technique_list(value) -> str | None:
    if not all(isinstance(v, str) for v in value):
        return "must be a list of technique names"
    unknown = [v for v in value if v not in TECHNIQUES]
    if unknown:
        near = difflib.get_close_matches(unknown[0], TECHNIQUES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"unknown technique {unknown[0]!r}{hint}; known: {', '.join(TECHNIQUES)}"
    if len(set(value)) != len(value):
        return "lists a technique twice"
    return None


def apply_techniques(base: dict, names, options: dict) -> dict:
    recipe = dict(base)
    for name in names:
        recipe.update(TECHNIQUES[name].overrides(recipe, options))
    return recipe


def ordered(names: list[str], order: str) -> list[str]:
    if order == "listed":
        return list(names)
    return sorted(names, key=lambda n: (CATEGORIES.index(TECHNIQUES[n].category), names.index(n)))


@dataclass
class Decision:
    technique: str
    category: str
    acc_without: float
    acc_with: float
    adopted: bool

    @property
    def gain(self) -> float:
        return self.acc_with - self.acc_without


def greedy_select(candidates: list[str], base: dict, options: dict, threshold: float,
                  trial: Callable[[dict], float]) -> tuple[list[str], list[Decision], float]:
    """Adopt each candidate whose trial beats the best so far by more than ``threshold``.

    ``trial(recipe)`` returns the mean validation accuracy of a short run
    (NaN when the run diverged: never adopted). Returns the adopted names, one
    decision per candidate, and the base recipe's trial accuracy.
    """
    adopted: list[str] = []
    base_acc = trial(apply_techniques(base, [], options))
    best = base_acc
    decisions = []
    for name in candidates:
        if TECHNIQUES[name].final_only:
            continue
        acc = trial(apply_techniques(base, adopted + [name], options))
        take = not math.isnan(acc) and (math.isnan(best) or acc - best > threshold)
        decisions.append(Decision(name, TECHNIQUES[name].category, best, acc, take))
        if take:
            adopted.append(name)
            best = acc
    return adopted, decisions, base_acc

