"""One registry of named architectures and one factory.

A *spec* is a plain dict (YAML/JSON/checkpoint friendly) that fully
describes a network; ``create_model`` turns any spec into a module, and
``create_spec`` turns a registered name (plus overrides) into a spec.
"""

from __future__ import annotations

import difflib
from functools import partial

from torch import nn

from sipa_core.errors import SipaError
from sipa_core.models.efficientnet import EfficientNet, efficientnet_spec
from sipa_core.entry_points import is_source
from sipa_core.models.sources import SOURCE_FAMILIES, build_source, source_family_spec, source_spec
from sipa_core.models.wrn import WideResNet, wrn_spec

# The searched SIPA baseline, unscaled block arguments (the authors' public code, Lee-Gihun/MicroNet_OSI-AI);
# width 0.9 gives the 24-16-24-40-40-48-64-64-80-80-96 table, resolution
# 1.4^2 = 1.96 the 63x63 input.
SIPA_BASELINE_BLOCKS = [
    "r1_k3_s1_e1_i24_o16_se0.2",
    "r1_k3_s1_e6_i16_o24_se0.2",
    "r2_k3_s2_e6_i24_o40_se0.2",
    "r1_k3_s1_e6_i40_o56_se0.2",
    "r2_k3_s1_e6_i56_o72_se0.2",
    "r2_k3_s2_e6_i72_o88_se0.2",
    "r1_k3_s1_e6_i88_o104_se0.2",
]

_FAMILIES = {"efficientnet": (EfficientNet, efficientnet_spec), "wrn": (WideResNet, wrn_spec),
             # networks from elsewhere (sipa_core/models/sources.py)
             **{f: (build_source, partial(source_family_spec, f)) for f in SOURCE_FAMILIES}}

ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "sipa_baseline": ("efficientnet", dict(blocks=SIPA_BASELINE_BLOCKS, width=0.9, depth=1.0, resolution=1.96,
                                           head=150, num_classes=100)),
    "sipa_baseline_32": ("efficientnet", dict(blocks=SIPA_BASELINE_BLOCKS, width=0.9, depth=1.0,
                                              resolution=1.0, head=150, num_classes=100)),
    "wrn28_10": ("wrn", dict(depth=28, widen=10, num_classes=100)),
}


def list_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def create_spec(name: str, **overrides) -> dict:
    """The spec of a registered architecture or of a source string (``torchvision:<name>``,
    ``timm:<name>``, ``file.py:function``), with keyword overrides applied."""
    if is_source(name):
        return source_spec(name, **overrides)
    if name not in ARCHITECTURES:
        near = difflib.get_close_matches(name, ARCHITECTURES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SipaError(f"unknown architecture {name!r}{hint}; known: {', '.join(list_architectures())}, "
                        f"or torchvision:<name>, timm:<name>, file.py:function")
    family, defaults = ARCHITECTURES[name]
    return create_family_spec(family, name=name, **{**defaults, **overrides})


def create_family_spec(family: str, **kwargs) -> dict:
    if family not in _FAMILIES:
        raise SipaError(f"unknown architecture family {family!r}; known: {', '.join(sorted(_FAMILIES))}")
    try:
        return _FAMILIES[family][1](**kwargs)
    except TypeError as err:  # an unexpected keyword in a hand-written spec
        raise SipaError(f"architecture ({family}): {err}") from None


def create_model(spec: dict | str, **overrides) -> nn.Module:
    """Build a network from a spec dict or a registered name."""
    if isinstance(spec, str):
        spec = create_spec(spec, **overrides)
    elif overrides:
        spec = {**spec, **overrides}
    if not isinstance(spec, dict) or "family" not in spec:
        raise SipaError("architecture: a spec must be a mapping with a 'family' key")
    fields = {k: v for k, v in spec.items() if k != "family"}
    spec = create_family_spec(spec["family"], **fields)  # re-check hand-written or stored specs
    return _FAMILIES[spec["family"]][0](spec)
