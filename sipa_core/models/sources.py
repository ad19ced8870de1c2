"""Networks from elsewhere: torchvision, timm, or the user's own module.

A source is written as a string wherever an architecture is named
(``search.preset``, ``improve.arch``, ``sipa score --arch``):

* ``torchvision:<name>``: ``torchvision.models.get_model(<name>)``, untrained;
* ``timm:<name>``: ``timm.create_model(<name>)`` (timm is optional);
* ``path/to/file.py:function`` or ``package.module:function``: the user's
  own builder, called as ``function(num_classes, **kwargs)``, returning an
  ``nn.Module``.

Keyword arguments follow in brackets, values read as YAML scalars:
``torchvision:mobilenet_v2(width_mult=0.5, small_input=true)``. Two are
sipa's own: ``small_input`` (default false) adapts an ImageNet network to
small images by setting its first convolution's stride to 1 and removing a
max pooling that comes before its second convolution (ResNet's stem pool),
so 32 px inputs keep 8x more resolution through the network; ``activation``
replaces every activation module (the improving stage's swap). The rest go
to the builder.

The spec records the source, its arguments, the class count, the image size
and, after filter pruning, every resized layer (``resized``), so that a
checkpoint rebuilds the same network. A user module is imported only when
the params name it (``trust_entry_point``): a checkpoint never causes an
import by itself.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

import yaml
from torch import nn
from torchvision.models import get_model, list_models

from sipa_core.entry_points import SOURCE_PATTERN, SOURCE_PREFIXES, is_trusted
from sipa_core.errors import SipaError
from sipa_core.models.layers import make_activation, swap_activations

SOURCE_FAMILIES = ("torchvision", "timm", "module")  # the families built from a source



def _kwargs(text: str | None, value: str) -> dict:
    if not text or not text.strip():
        return {}
    out = {}
    for item in text.split(","):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise SipaError(f"network source {value!r}: arguments are key=value, comma-separated; got {item.strip()!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw.strip())
        except yaml.YAMLError:
            raise SipaError(f"network source {value!r}: cannot read the value of {key.strip()}") from None
    return out


def source_spec(value: str, *, num_classes: int = 100, image_size: int = 32) -> dict:
    """The spec of a source string (checked: the builder exists, for torchvision and timm)."""
    match = SOURCE_PATTERN.match(value)
    if not match:
        raise SipaError(f"network source {value!r}: expected prefix:name or file.py:function, with (key=value, ...)")
    target, kwargs = match["target"].strip(), _kwargs(match["args"], value)
    prefix, _, name = target.rpartition(":")
    family = prefix if prefix in SOURCE_PREFIXES else "module"
    return source_family_spec(family, model=name if family != "module" else None,
                              entry_point=target if family == "module" else None, num_classes=num_classes,
                              image_size=image_size, **kwargs)


def source_family_spec(family: str, *, model=None, entry_point=None, name=None, num_classes=100, image_size=32,
                       small_input=False, activation=None, kwargs=None, resized=None, **builder_kwargs) -> dict:
    """A complete, plain-data spec of a network from a source (``name`` is derived from it); extra
    keywords go to the builder."""
    builder_kwargs = {**(kwargs or {}), **builder_kwargs}
    if family == "module":
        if not entry_point or ":" not in entry_point:
            raise SipaError(f"architecture (module): entry_point must be file.py:function or package.module:function, "
                            f"got {entry_point!r}")
        label = entry_point
    else:
        if not model:
            raise SipaError(f"architecture ({family}): a model name is needed")
        _check_name(family, model)
        label = f"{family}:{model}"
    if not isinstance(small_input, bool):
        raise SipaError(f"architecture ({label}): small_input must be true or false, got {small_input!r}")
    if activation is not None:
        make_activation(activation)  # an unknown name fails here
    spec = {"family": family, "name": label, "num_classes": int(num_classes), "image_size": int(image_size),
            "small_input": small_input, "activation": activation, "kwargs": dict(builder_kwargs)}
    if family == "module":
        spec["entry_point"] = entry_point
    else:
        spec["model"] = model
    if resized:
        spec["resized"] = {str(k): {a: int(n) for a, n in v.items()} for k, v in resized.items()}
    return spec


def _check_name(family: str, name: str) -> None:
    if family == "torchvision":
        known = list_models()
    else:
        known = _timm().list_models()
    if name not in known:
        near = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SipaError(f"{family} has no model {name!r}{hint}")


def _timm():
    try:
        import timm  # noqa: PLC0415 - optional: only a timm: source needs it
    except ImportError:
        raise SipaError("timm: networks are not installed (pip install timm) for a timm: source") from None
    return timm


def _builder(entry_point: str):
    if not is_trusted(entry_point):
        raise SipaError(f"the network comes from the entry point {entry_point!r}, which the params do not name; "
                        f"a checkpoint never imports code by itself: name it in search.preset or improve.arch "
                        f"(or sipa score --arch)")
    where, _, function = entry_point.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise SipaError(f"network entry point {entry_point!r}: file {where} not found")
        name = f"sipa_network_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
        loader = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise SipaError(f"network entry point {entry_point!r}: cannot import {where} ({err})") from None
    build = getattr(module, function, None)
    if not callable(build):
        raise SipaError(f"network entry point {entry_point!r}: {where} has no function {function!r}")
    return build


def build_source(spec: dict) -> nn.Module:
    """The network of a source spec: built, adapted (small_input, activation), resized as recorded."""
    family, kwargs = spec["family"], dict(spec.get("kwargs") or {})
    if family == "torchvision":
        model = _call(spec, get_model, spec["model"], weights=None, num_classes=spec["num_classes"], **kwargs)
    elif family == "timm":
        model = _call(spec, _timm().create_model, spec["model"], pretrained=False, num_classes=spec["num_classes"],
                      **kwargs)
    else:
        model = _call(spec, _builder(spec["entry_point"]), spec["num_classes"], **kwargs)
        if not isinstance(model, nn.Module):
            raise SipaError(f"network entry point {spec['entry_point']!r} returned {type(model).__name__}, "
                            f"not a torch.nn.Module")
    if spec.get("small_input"):
        adapt_to_small_input(model, spec["name"])
    if spec.get("activation"):
        swap_activations(model, spec["activation"])
    if spec.get("resized"):
        resize_layers(model, spec["resized"], spec["name"])
    model.spec = dict(spec)
    return model


def _call(spec, build, *args, **kwargs):
    try:
        return build(*args, **kwargs)
    except TypeError as err:  # an argument the builder does not take
        raise SipaError(f"architecture ({spec['name']}): {err}") from None


def adapt_to_small_input(model: nn.Module, label: str) -> None:
    """First convolution at stride 1; a max pooling before the second convolution removed."""
    convs = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                convs += 1
                if convs == 1:
                    child.stride = (1, 1)
            elif isinstance(child, nn.MaxPool2d) and convs == 1:
                setattr(parent, child_name, nn.Identity())
    if convs == 0:
        raise SipaError(f"architecture ({label}): small_input needs a network with a Conv2d")


RESIZABLE = {nn.Conv2d: ("in_channels", "out_channels", "groups"), nn.BatchNorm2d: ("num_features",),
             nn.Linear: ("in_features", "out_features")}


def resized_layers(model: nn.Module, fresh: nn.Module) -> dict:
    """The layers of ``model`` whose sizes differ from the freshly built ``fresh`` (after filter pruning)."""
    built = dict(fresh.named_modules())
    out = {}
    for name, module in model.named_modules():
        attrs = next((a for t, a in RESIZABLE.items() if isinstance(module, t)), None)
        if attrs and name in built:
            sizes = {a: int(getattr(module, a)) for a in attrs}
            if sizes != {a: int(getattr(built[name], a)) for a in attrs}:
                out[name] = sizes
    return out


def resize_layers(model: nn.Module, resized: dict, label: str) -> None:
    """Give each recorded layer its recorded sizes, with parameters and buffers of the matching shapes
    (their values come from the checkpoint)."""
    modules = dict(model.named_modules())
    for name, sizes in resized.items():
        module = modules.get(name)
        if module is None:
            raise SipaError(f"architecture ({label}): recorded layer {name!r} is not in the network")
        for attr, n in sizes.items():
            setattr(module, attr, n)
        for pname, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            shape = _shape(module, pname, tensor)
            if tuple(shape) != tuple(tensor.shape):
                new = tensor.new_empty(shape)
                if isinstance(tensor, nn.Parameter):
                    setattr(module, pname, nn.Parameter(new, requires_grad=tensor.requires_grad))
                else:
                    module.register_buffer(pname, new)


def _shape(module, pname, tensor):
    if isinstance(module, nn.Conv2d):
        if pname == "weight":
            return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        return (module.out_channels,)
    if isinstance(module, nn.BatchNorm2d):
        return tensor.shape if pname == "num_batches_tracked" else (module.num_features,)
    if pname == "weight":
        return (module.out_features, module.in_features)
    return (module.out_features,)
