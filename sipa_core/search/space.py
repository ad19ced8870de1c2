"""The search space (SIPA section 2.1): block arguments per stage of a template
network (kernel, expansion, repeats, channels, SE ratio, stride placement),
then compound scaling as the authors parameterised it: depth, width, and a
resolution coefficient r whose power r^phi (phi: the resource exponent,
2 in the paper) is the input upsampling factor, rounded to 2 decimals; r 1.4
gives 1.96 and 63 px from 32. Points of the hyperopt space
decode to block strings and an architecture spec here, and nowhere else."""

from __future__ import annotations

import itertools
import math

import numpy as np

from sipa_core.models import efficientnet_spec
from sipa_core.models.blocks import BlockArgs, round_filters
from sipa_core.params import Field
from sipa_core.scoring import count
from sipa_core.stage_common import create_seeded_model


def _choices(kind):
    def check(value):
        if not value:
            return "must list at least one value"
        if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            return f"must be a list of {'integers' if kind is int else 'numbers'}"
        if any(v <= 0 for v in value):
            return "values must be positive"
        return None
    return check


def _range(kind):
    def check(value):
        if len(value) != 2 or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            return f"must be [min, max] ({'integers' if kind is int else 'numbers'})"
        if value[0] > value[1]:
            return f"min {value[0]} is above max {value[1]}"
        if value[0] <= 0:
            return "min must be > 0"
        return None
    return check


SCALING_KEYS = ("depth", "width", "r")

SPACE_SCHEMA = {
    "kernel": Field(list, [3, 5], check=_choices(int), help="kernel sizes to choose from, per stage"),
    "expand": Field(list, [4, 6], check=_choices(int),
                    help="expansion ratios, per stage (the first stage keeps its own)"),
    "repeats": Field(list, [1, 2], check=_range(int), help="[min, max] repeats per stage"),
    "channels": Field(list, [0.75, 1.0, 1.25], check=_choices((int, float)),
                      help="multipliers of the template's output channels, per stage"),
    "se_ratio": Field(list, [0.2, 0.4], check=_range((int, float))),
    "stride_placement": Field(bool, True, help="search which stages have stride 2 (their number stays)"),
    "r": Field(list, [1.0, 1.4], check=_range((int, float)),
               help="[min, max] resolution coefficient; the input is upsampled by round(r^phi, 2)"),
    "width": Field(list, [0.8, 1.0], check=_range((int, float)), help="[min, max] width multiplier"),
    "depth": Field(list, [1.0, 1.0], check=_range((int, float))),
    "phi": Field(float, 2.0, min=0, min_exclusive=True,
                 help="resource exponent: the upsampling factor is round(r^phi, 2) (the authors' avail_resource)"),
}


def stride_options(template: list[BlockArgs]) -> list[tuple[int, ...]]:
    """Which stages may carry the template's stride-2 count (never the first)."""
    n2 = sum(b.stride == 2 for b in template)
    return [list(c) for c in itertools.combinations(range(1, len(template)), n2)]


def hyperopt_space(step: str, cfg: dict):
    from hyperopt import hp  # noqa: PLC0415 -- heavy (about 2.5 s): only a search run needs it

    sp, template = cfg["space"], cfg["template_args"]
    if step == "scaling":
        return {key: hp.uniform(key, *sp[key]) if sp[key][0] < sp[key][1] else sp[key][0]
                for key in SCALING_KEYS}
    space = {"se_ratio": hp.uniform("se_ratio", *sp["se_ratio"])}
    if sp["stride_placement"]:
        space["strides"] = hp.choice("strides", stride_options(template))
    lo, hi = sp["repeats"]
    for i in range(len(template)):
        space[f"k{i}"] = hp.choice(f"k{i}", sp["kernel"])
        if i > 0:  # the first stage keeps its expansion (EfficientNet's e1 stage)
            space[f"e{i}"] = hp.choice(f"e{i}", sp["expand"])
        space[f"r{i}"] = hp.quniform(f"r{i}", lo - 0.5, hi + 0.5, 1) if lo < hi else lo
        space[f"c{i}"] = hp.choice(f"c{i}", sp["channels"])
    return space


def vals_from_point(step: str, cfg: dict, point: dict) -> dict:
    """hyperopt's raw ``vals`` (choice indices, numbers) of a decoded point of ``hyperopt_space``."""
    sp, template = cfg["space"], cfg["template_args"]
    vals = {}
    if step == "scaling":
        for key in SCALING_KEYS:
            if sp[key][0] < sp[key][1]:
                vals[key] = [float(point[key])]
        return vals
    vals["se_ratio"] = [float(point["se_ratio"])]
    if sp["stride_placement"]:
        vals["strides"] = [stride_options(template).index(list(point["strides"]))]
    for i in range(len(template)):
        vals[f"k{i}"] = [sp["kernel"].index(point[f"k{i}"])]
        if i > 0:
            vals[f"e{i}"] = [sp["expand"].index(point[f"e{i}"])]
        if sp["repeats"][0] < sp["repeats"][1]:
            vals[f"r{i}"] = [float(point[f"r{i}"])]
        vals[f"c{i}"] = [sp["channels"].index(point[f"c{i}"])]
    return vals


def blocks_from(point: dict, cfg: dict) -> list[str]:
    """Block strings of a step-1 point (chained: each stage takes the previous one's output)."""
    template = cfg["template_args"]
    strides = set(point["strides"]) if "strides" in point else {i for i, b in enumerate(template) if b.stride == 2}
    lo, hi = cfg["space"]["repeats"]
    out, prev = [], template[0].in_ch
    for i, b in enumerate(template):
        ch = max(8, round_filters(b.out_ch, float(point[f"c{i}"])))
        repeats = int(min(hi, max(lo, round(point[f"r{i}"]))))
        expand = b.expand if i == 0 else int(point[f"e{i}"])
        out.append(BlockArgs(repeats, int(point[f"k{i}"]), 2 if i in strides else 1, expand, prev, ch,
                             round(float(point["se_ratio"]), 3)).encode())
        prev = ch
    return out


def resolution_factor(r: float, phi: float) -> float:
    """The input upsampling factor of resolution coefficient ``r``: round(r^phi, 2) (r 1.4, phi 2 -> 1.96)."""
    return round(r ** phi, 2)


def scaling_of(depth: float, width: float, r: float, phi: float) -> dict:
    return {"depth": float(depth), "width": float(width), "r": float(r),
            "resolution": resolution_factor(float(r), phi)}


def create_candidate_spec(blocks: list[str], scaling: dict, cfg: dict, data_classes: int, image_size: int) -> dict:
    return efficientnet_spec(blocks, width=scaling["width"], depth=scaling["depth"],
                             resolution=scaling["resolution"], head=cfg["head"], num_classes=data_classes,
                             image_size=image_size)


def candidate(step: str, point: dict, cfg: dict, fixed: dict, num_classes: int, image_size: int):
    """(blocks, scaling, spec) of a proposed point."""
    if step == "blocks":
        blocks, scaling = blocks_from(point, cfg), dict(cfg["base_scaling"])
    else:
        blocks = fixed["blocks"]
        scaling = scaling_of(point["depth"], point["width"], point["r"], cfg["space"]["phi"])
    return blocks, scaling, create_candidate_spec(blocks, scaling, cfg, num_classes, image_size)


def jsonable(point: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else float(v) if isinstance(v, (float, np.floating))
                else int(v) if isinstance(v, (int, np.integer)) else v) for k, v in point.items()}


def smallest_score(cfg: dict, num_classes: int, image_size: int) -> float:
    """The score of the smallest network the space holds (a budget below it can never be met)."""
    sp = cfg["space"]
    point = {"se_ratio": sp["se_ratio"][0]}
    for i in range(len(cfg["template_args"])):
        point.update({f"k{i}": min(sp["kernel"]), f"e{i}": min(sp["expand"]), f"r{i}": sp["repeats"][0],
                      f"c{i}": min(sp["channels"])})
    blocks = blocks_from(point, cfg) if "blocks" in cfg["steps"] else list(cfg["template"])
    best = math.inf
    for depth, width, r in itertools.product(sp["depth"], sp["width"], sp["r"]):
        scaling = scaling_of(depth, width, r, sp["phi"]) if "scaling" in cfg["steps"] else dict(cfg["base_scaling"])
        model = create_seeded_model(create_candidate_spec(blocks, scaling, cfg, num_classes, image_size), 0)
        best = min(best, count(model, (3, image_size, image_size), bits=cfg["bits"])["score"])
    return best

