"""Where a network can be split for an early exit, and its two halves, for any network.

A built-in EfficientNet says it itself (``boundaries``, ``forward_stem``,
``forward_blocks``, ``forward_head``). Any other network is traced with
torch.fx: its *stages* are the children of the first module, from the root
down the trunk, that has at least ``MIN_STAGES`` children containing a
convolution whose outputs are cut points of the forward (everything after
reads only that output, no skip connection crosses it): torchvision's ResNet
``conv1, layer1 .. layer4``, MobileNetV2's ``features.0 .. features.18``. A
stage's output shape comes from one dry forward. The two halves run the
traced graph up to the cut and from it on, calling the network's own modules
by name at run time, so quantized layers swapped in later are the ones run.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import fx, nn

from sipa_core.errors import SipaError
from sipa_core.models.efficientnet import BlockInfo

MIN_STAGES = 3
MAX_DEPTH = 4


@dataclass(frozen=True)
class _Trace:
    prefix: list[fx.Graph]  # per stage: input -> the stage's output
    rest: list[fx.Graph]  # per stage: the stage's output -> logits
    infos: tuple[BlockInfo, ...]


_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _StageTracer(fx.Tracer):
    """Traces only through the modules on the path to ``parent``; every other module is one call."""

    def __init__(self, path: set[str]):
        super().__init__()
        self.path = path

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname not in self.path


def _has_conv(m: nn.Module) -> bool:
    return any(isinstance(x, nn.Conv2d) for x in m.modules())


def _cut_points(graph: fx.Graph) -> set[fx.Node]:
    """Nodes after which nothing reads a value computed before them (but themselves)."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    earliest_read = {}  # node -> the earliest-computed input of any node at or after it
    low = len(nodes)
    for n in reversed(nodes):
        for a in n.all_input_nodes:
            if a.op != "get_attr":
                low = min(low, order[a])
        earliest_read[n] = low
    cuts = set()
    for i, n in enumerate(nodes[:-1]):
        if n.op == "call_module" and earliest_read[nodes[i + 1]] >= i and len(n.users) >= 1:
            cuts.add(n)
    return cuts


def _trace(model: nn.Module, parent: str) -> tuple[fx.Graph, list[fx.Node]] | None:
    path = {""} | {".".join(parent.split(".")[:k]) for k in range(1, len(parent.split(".")) + 1)} if parent else {""}
    try:
        graph = _StageTracer(path).trace(model)
    except Exception:  # noqa: BLE001 - a forward fx cannot trace has no stages found this way
        return None
    prefix = f"{parent}." if parent else ""
    children = {f"{prefix}{n}" for n, c in model.get_submodule(parent).named_children() if _has_conv(c)}
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target in children]
    if len({n.target for n in calls}) != len(calls):
        return None  # a stage module called twice
    cuts = _cut_points(graph)
    return graph, [n for n in calls if n in cuts]


def _find_stages(model: nn.Module) -> tuple[fx.Graph, list[fx.Node]]:
    parent = ""
    for _ in range(MAX_DEPTH):
        found = _trace(model, parent)
        if found is not None and len(found[1]) >= MIN_STAGES:
            return found
        module = model.get_submodule(parent)
        trunk = max(module.named_children(), key=lambda c: sum(isinstance(m, nn.Conv2d) for m in c[1].modules()),
                    default=None)
        if trunk is None:
            break
        parent = f"{parent}.{trunk[0]}" if parent else trunk[0]
    raise SipaError(f"early exits: no stages found in {type(model).__name__} (torch.fx found no {MIN_STAGES} "
                    f"modules with convolutions whose outputs the rest of the forward reads alone)")


def _halves(graph: fx.Graph, cut: fx.Node) -> tuple[fx.Graph, fx.Graph]:
    prefix, rest = fx.Graph(), fx.Graph()
    env: dict = {}
    for n in graph.nodes:
        env[n] = prefix.node_copy(n, lambda a: env[a])
        if n is cut:
            prefix.output(env[n])
            break
    env = {cut: rest.placeholder("features")}
    after = False
    for n in graph.nodes:
        if after or n.op == "get_attr":
            env[n] = rest.node_copy(n, lambda a: env[a])
        after = after or n is cut
    return prefix, rest


def _traced(model: nn.Module) -> _Trace:
    if model in _TRACES:
        return _TRACES[model]
    graph, stages = _find_stages(model)
    shapes = {}

    def record(name):
        def hook(module, args, out):
            shapes.setdefault(name, tuple(out.shape))
        return hook

    hooks = [model.get_submodule(n.target).register_forward_hook(record(n.target)) for n in stages]
    size = int(getattr(model, "spec", {}).get("image_size", 32))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    infos = tuple(BlockInfo(i, shapes[n.target][1], shapes[n.target][-1], n.target) for i, n in enumerate(stages))
    halves = [_halves(graph, n) for n in stages]
    trace = _Trace([p for p, _ in halves], [r for _, r in halves], infos)
    _TRACES[model] = trace
    return trace


def boundaries(model: nn.Module) -> tuple[BlockInfo, ...]:
    """Block ends, in order: where an early exit can attach (the last one is the network's end)."""
    if hasattr(model, "boundaries"):
        return model.boundaries()
    return _traced(model).infos


def features(model: nn.Module, x: torch.Tensor, position: int) -> torch.Tensor:
    """The feature map after block ``position``."""
    if hasattr(model, "forward_blocks"):
        return model.forward_blocks(model.forward_stem(x), 0, position + 1)
    return fx.Interpreter(model, graph=_traced(model).prefix[position]).run(x)


def rest(model: nn.Module, h: torch.Tensor, position: int) -> torch.Tensor:
    """The network's logits from the feature map after block ``position``."""
    if hasattr(model, "forward_blocks"):
        return model.forward_head(model.forward_blocks(h, position + 1))
    return fx.Interpreter(model, graph=_traced(model).rest[position]).run(h)


def head_width(model: nn.Module) -> int:
    """The width of the network's last features (its classifier's input)."""
    if hasattr(model, "num_features"):
        return int(model.num_features)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SipaError(f"early exits: {type(model).__name__} has no Linear classifier to size the exit from")
    return int(linears[-1].in_features)
