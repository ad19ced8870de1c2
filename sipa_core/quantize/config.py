"""The quantizing stage's parameters: the schema of its ``quantize`` section, read and checked
before any work, the widths it names, and the keys a file sets that its own settings leave unused."""

from __future__ import annotations

import re
from pathlib import Path

from sipa_core.errors import SipaError
from sipa_core.params import Field, check_section, refuse_keys
from sipa_core.paths import path_fields, read_params
from sipa_core.quantize.quantizers import ACT_QUANTIZERS, WEIGHT_SCALES
from sipa_core.quantize.relus import why_not_fused
from sipa_core.quantize.training import QAT_RECIPE, schedule_steps
from sipa_core.scoring.bits import BitWidths, parse_add
from sipa_core.train.recipe import check_recipe

ELEMENTWISE_BITS = 16  # the elementwise products are not quantized (width_run.py)


def _layers(value) -> str | None:
    for pattern, widths in value.items():
        if not (isinstance(widths, list) and len(widths) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in widths)):
            return f"{pattern}: give [weight bits, activation bits], e.g. [8, 8]"
    return None


def _add_accounting(value) -> str | None:
    try:
        parse_add(value)
    except SipaError as err:
        return str(err)
    return None


def _schedule(value) -> str | None:
    if not all(isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 16 for v in value):
        return f"give widths from 2 to 16, e.g. [8, 6], got {value}"
    for a, b in zip(value, value[1:]):
        if b >= a:
            return f"a width schedule falls step by step ({a} then {b} rises or stays)"
    return None


def _choices(value) -> str | None:
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 16 for v in value):
        return "must list widths, each an integer from 2 to 16"
    return "lists a width twice" if len(set(value)) != len(value) else None


def _labels(value) -> str | None:
    for label in value:
        if parse_label(label) is None:
            return f"{label!r} is not a width label such as W4A8"
    return None


def parse_label(label) -> tuple[int, int] | None:
    """``"W4A8"`` -> (4, 8); None when it is not such a label."""
    m = re.fullmatch(r"W(\d+)A(\d+)", str(label))
    return (int(m.group(1)), int(m.group(2))) if m else None


QUANTIZE_SCHEMA = {
    "weight_bits": Field(int, 8, min=2, max=16, help="default weight width (16: left in floating point)"),
    "act_bits": Field(int, 8, min=2, max=16, help="default width of conv/linear inputs (16: floating point)"),
    "add_bits": Field((int, str), 32, check=_add_accounting,
                      help="how `score` counts additions: a width (32: strict) or int / tree (the 2019 "
                           "entries' accountings, docs/scoring.md); the adder-tree accounting is always "
                           "recorded too (score_tree)"),
    "layers": Field(dict, {}, check=_layers,
                    help="per-layer widths by module-name pattern, first match wins: {stem: [8, 8]}"),
    "epochs": Field(int, 2, min=0, help="QAT epochs of the main network"),
    "exit_epochs": Field(int, 1, min=0, help="QAT epochs of the exit on the frozen quantized network"),
    "recipe": Field(dict, {}, help="overrides of the QAT recipe (QAT_RECIPE in quantize/training.py)"),
    "calibration_batches": Field(int, 4, min=1, help="training batches that set the activation scales"),
    "act_quantizers": Field(str, "fitted", choices=ACT_QUANTIZERS,
                            help="fitted: each layer's input quantizer from its range (unsigned, shifted with a "
                                 "zero point, or signed); signed: every input signed"),
    "output_bits": Field(int, 8, nullable=True, min=2, max=8,
                         help="width of every integer layer's output quantizer (the conv / linear result before "
                              "its activation): onnxruntime then runs each layer as one integer kernel (QLinearConv, "
                              "QGemm); null: float outputs, the layers run as ConvInteger with float arithmetic "
                              "around them (slower)"),
    "fuse_relu": Field(bool, True,
                       help="a ReLU that reads an integer layer's output alone takes that layer's output "
                            "quantizer (unsigned, zero point 0), so onnxruntime folds the ReLU into the layer's "
                            "kernel; false: quantized before the ReLU, which runs in float between them "
                            "(needs output_bits and act_quantizers: fitted)"),
    "weight_scale": Field(str, "stats", choices=WEIGHT_SCALES,
                          help="stats: per-channel scale from max |w| at every step; learned: trained, "
                               "MSE-initialised (LSQ)"),
    "scale_lr": Field(float, None, nullable=True, min=0, min_exclusive=True,
                      help="learning rate of the quantizers' scales and zero points, without weight decay "
                           "(null: the recipe's lr and weight decay)"),
    "schedule": Field(list, [], check=_schedule,
                      help="widths trained before the final ones, falling, e.g. [8, 6] (each caps weights and "
                           "activations from below; steps not above the final widths are skipped)"),
    "schedule_epochs": Field(int, 1, min=1, help="QAT epochs of each schedule step"),
    "layer_widths": Field(str, "uniform", choices=("uniform", "allocated"),
                          help="allocated: each layer's width chosen from width_choices under budget or max_drop "
                               "(sensitivity on validation, exact per-layer cost, an integer program)"),
    "width_choices": Field(list, [8, 6, 4], check=_choices, help="allocated: the widths a layer may take"),
    "budget": Field(float, None, nullable=True, min=0, min_exclusive=True,
                    help="allocated: the main network's score (add_bits accounting) at most this; least drop"),
    "max_drop": Field(float, None, nullable=True, min=0, max=1,
                      help="allocated: summed single-layer validation drops at most this; lowest score"),
    "compare_widths": Field(list, ["W4A8", "W4A4"], check=_labels,
                            help="other widths trained for the plot, e.g. [W4A8, W4A4]"),
    "seed": Field(int, 0, min=0),
    **path_fields("quantize", model=("accelerate", "out"), data=("prepare", "out")),
}


def read_config(params_path: str | Path) -> dict:
    data = read_params(params_path)
    cfg = check_section(data.get("quantize"), QUANTIZE_SCHEMA, file=params_path, section="quantize")
    refuse_keys(cfg["recipe"], ("epochs", "seed"), file=params_path, section="quantize.recipe",
                why="set quantize.epochs / quantize.exit_epochs / quantize.seed instead")
    check_recipe({**QAT_RECIPE, **cfg["recipe"], "epochs": cfg["epochs"]}, file=params_path,
                 section="quantize.recipe")
    for pattern, (w, a) in cfg["layers"].items():
        for what, bits in (("weight", w), ("activation", a)):
            if not 2 <= bits <= 16:
                raise SipaError(f"{params_path}: quantize.layers.{pattern}: {what} bits must be 2..16, got {bits}")
    if cfg["schedule"]:
        check_recipe({**QAT_RECIPE, **cfg["recipe"], "epochs": cfg["schedule_epochs"], "stabilize_epochs": 0},
                     file=params_path, section="quantize.recipe (each schedule step)")
    _check_allocation(cfg, params_path)
    try:
        cfg["widths"] = widths_of(cfg, cfg["weight_bits"], cfg["act_bits"])
    except SipaError as err:
        raise SipaError(f"{params_path}: quantize: {err}") from None
    return cfg


def _check_allocation(cfg: dict, params_path) -> None:
    if cfg["layer_widths"] != "allocated":
        return
    if (cfg["budget"] is None) == (cfg["max_drop"] is None):
        raise SipaError(f"{params_path}: quantize.layer_widths: allocated needs exactly one of budget (a score) "
                        f"and max_drop (a validation accuracy drop)")
    if cfg["layers"]:
        raise SipaError(f"{params_path}: quantize.layers: per-layer widths are set by hand or allocated "
                        f"(layer_widths: allocated), not both")


def widths_of(cfg: dict, weight: int, act: int) -> BitWidths:
    overrides = tuple((p, int(w), int(a)) for p, (w, a) in cfg["layers"].items())
    return BitWidths(weight, act, cfg["add_bits"], overrides, ELEMENTWISE_BITS)


def inactive(cfg: dict, raw: dict) -> list[str]:
    """Keys set in the file that these settings do not use."""
    out = [f"quantize.{k}: layer_widths is uniform" for k in ("width_choices", "budget", "max_drop")
           if k in raw and cfg["layer_widths"] == "uniform"]
    if "fuse_relu" in raw and why_not_fused(cfg):
        out.append(f"quantize.fuse_relu: {why_not_fused(cfg)}")
    return out + _inactive_schedule(cfg, raw)


def _inactive_schedule(cfg: dict, raw: dict) -> list[str]:
    if not cfg["schedule"]:
        return ["quantize.schedule_epochs: schedule is empty (QAT trains at the final widths only)"] \
            if "schedule_epochs" in raw else []
    if len(schedule_steps(cfg, cfg["widths"])) == 1:
        return [f"quantize.schedule: no width of {cfg['schedule']} is above {cfg['widths'].label()}, "
                "the main widths train without steps"]
    return []
