"""A training recipe: every knob of the one training engine, in one schema.

Stages embed a recipe in their params section (``improve.recipe``,
``prune.recipe``, ...); ``check_recipe`` validates it with the file and
dotted key in every message.
"""

from __future__ import annotations

from sipa_core.errors import SipaError
from sipa_core.models.layers import ACTIVATIONS
from sipa_core.params import Field, check_section

SCHEDULES = ("cosine", "step", "constant")
AUGMENTS = ("none", "autoaugment", "randaugment", "trivialaugment", "sipa_cifar100")
PRECISIONS = ("fp32", "bf16", "fp16")

RECIPE_SCHEMA = {
    "epochs": Field(int, 1, min=0, help="training epochs (before stabilisation)"),
    "batch_size": Field(int, 128, min=1),
    "eval_batch_size": Field(int, 500, min=1),
    "lr": Field(float, 0.1, min=0, min_exclusive=True, help="initial learning rate (after warmup)"),
    "momentum": Field(float, 0.9, min=0, max=1, max_exclusive=True),
    "nesterov": Field(bool, False),
    "weight_decay": Field(float, 5e-4, min=0),
    "no_bias_decay": Field(bool, False, help="no weight decay on biases"),
    "no_bn_decay": Field(bool, False, help="no weight decay on BatchNorm weights and biases"),
    "schedule": Field(str, "cosine", choices=SCHEDULES),
    "lr_min": Field(float, 0.0, min=0, help="cosine: final learning rate"),
    "step_every": Field(int, 30, min=1, help="step: epochs between decays"),
    "step_gamma": Field(float, 0.1, min=0, min_exclusive=True, max=1),
    "warmup_epochs": Field(int, 0, min=0, help="linear warmup from 0 to lr"),
    "label_smoothing": Field(float, 0.0, min=0, max=1, max_exclusive=True),
    "mixup_alpha": Field(float, 0.0, min=0, help="0 = off; one lambda ~ Beta(a, a) per batch"),
    "cutmix_alpha": Field(float, 0.0, min=0, help="0 = off; with mixup, each batch picks one of them"),
    "ghost_batch": Field(int, 0, min=0, help="ghost BatchNorm virtual batch size; 0 = off"),
    "activation": Field(str, None, nullable=True, choices=tuple(sorted(ACTIVATIONS)),
                        help="swap every activation for this one; null = keep the architecture's"),
    "dropout": Field(float, None, nullable=True, min=0, max=1, max_exclusive=True),
    "drop_connect": Field(float, None, nullable=True, min=0, max=1, max_exclusive=True),
    "augment": Field(str, "none", choices=AUGMENTS,
                     help="policy before crop and flip: a torchvision one, or sipa_cifar100 (the authors', per image)"),
    "augment_group": Field(int, 8, min=1, help="torchvision policies: images that share one sampled op (batched)"),
    "crop_padding": Field(int, 4, min=0, help="random crop with this zero padding; 0 = off"),
    "flip": Field(bool, True, help="random horizontal flip"),
    "stabilize_epochs": Field(int, 0, min=0, help="final epochs at stabilize_lr with crop/flip only"),
    "stabilize_lr": Field(float, 0.001, min=0, min_exclusive=True),
    "precision": Field(str, "fp32", choices=PRECISIONS, help="autocast dtype on the training device"),
    "channels_last": Field(bool, True, help="NHWC memory format (CPU: ~25% faster steps for sipa_baseline_32)"),
    "compile": Field(bool, False, help="torch.compile the training step's model (GPU: faster after warm-up)"),
    "compile_mode": Field(str, "default", choices=("default", "reduce-overhead", "max-autotune"),
                          help="with compile: torch.compile's mode (reduce-overhead: CUDA graphs)"),
    "distill_weight": Field(float, 0.0, min=0, max=1,
                            help="distillation: the loss is (1 - w) x the task loss + w x T^2 x KL(teacher || "
                                 "student) at temperature T; 0 = off. Only where the stage has a teacher (prune: "
                                 "its input network; quantize: its floating-point input)"),
    "distill_temperature": Field(float, 4.0, min=0, min_exclusive=True,
                                 help="distillation temperature T (with distill_weight > 0)"),
    "seed": Field(int, 0, min=0),
    "deterministic": Field(bool, True, help="deterministic kernels (same run, same metrics on the CPU)"),
    "device": Field(str, "auto", help="auto | cpu | cuda | cuda:N"),
}
# How to run fast, not what to learn: what a stage training its own recipe (the exit, QAT) takes
# from its input checkpoint's recipe.
SPEED_KEYS = ("precision", "channels_last", "compile", "device", "deterministic", "eval_batch_size")


def speed_settings(recipe: dict | None) -> dict:
    """The speed settings of ``recipe`` (an input checkpoint's; None: none)."""
    return {k: v for k, v in (recipe or {}).items() if k in SPEED_KEYS}


def check_recipe(values, *, file="params.yaml", section="recipe") -> dict:
    """The recipe with defaults filled in; errors name ``file: section.key``."""
    recipe = check_section(values, RECIPE_SCHEMA, file=file, section=section)
    if recipe["compile_mode"] != "default" and not recipe["compile"]:
        raise SipaError(f"{file}: {section}.compile_mode: {recipe['compile_mode']} needs compile: true")
    return recipe


def refuse_distillation(recipe: dict, *, file, section: str) -> None:
    """A stage without a teacher refuses a distillation weight instead of ignoring it."""
    if recipe.get("distill_weight"):
        raise SipaError(f"{file}: {section}.distill_weight: this stage has no teacher to distil from "
                        f"(the prune and quantize stages have one); leave it 0")


def default_recipe(**overrides) -> dict:
    return check_recipe(overrides, file="<defaults>")
