"""Early exit (SIPA section 2.4, Appendix A.4): an exit module after a block,
the softsmoothing loss, confidence thresholds, expected-cost counting and
real adaptive inference.

A sample leaves at the exit when the exit's maximum softmax is above the
threshold; the others continue through the rest of the network. Expected
math ops = r * (path to the exit + exit module) + (1 - r) * (whole network
+ exit module); parameters = main network + exit module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sipa_core.errors import SipaError
from sipa_core.models import split
from sipa_core.models.layers import make_activation
from sipa_core.scoring import REFERENCE_BYTES, REFERENCE_OPS, BitWidths, count, expected_ops
from sipa_core.scoring.counter import tree_keys
from sipa_core.train.evaluation import normalized

LOSSES = ("softsmoothing", "cross_entropy")


class ExitModule(nn.Sequential):
    """The paper's exit: depthwise kxk -> BN -> act -> 1x1 to ``width`` -> BN -> act -> pool -> linear."""

    def __init__(self, channels: int, width: int, num_classes: int, activation: str = "swish", kernel: int = 3):
        if kernel % 2 != 1:
            raise SipaError(f"exit kernel must be odd (same padding), got {kernel}")
        super().__init__(
            nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False),
            nn.BatchNorm2d(channels), make_activation(activation),
            nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), make_activation(activation),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


@dataclass(frozen=True)
class ExitConfig:
    """Where an exit sits and its shape: after block ``position`` (``channels`` x ``size`` x ``size``
    features), a depthwise ``kernel``, a 1x1 expansion to ``width``, ``num_classes`` outputs."""

    position: int
    channels: int
    size: int
    width: int
    kernel: int
    activation: str
    num_classes: int

    def as_dict(self) -> dict:
        return asdict(self)


def exit_config(main: nn.Module, position: int, width: int | None = None, kernel: int = 3,
                activation: str | None = None) -> ExitConfig:
    """The exit after block ``position`` of ``main``."""
    infos = split.boundaries(main)
    if not 0 <= position < len(infos) - 1:
        raise SipaError(f"exit position {position} is not a block before the last one (0..{len(infos) - 2})")
    return ExitConfig(int(position), int(infos[position].out_channels), int(infos[position].out_size),
                      int(width or split.head_width(main)), int(kernel),
                      activation or main.spec.get("activation") or "swish", int(main.spec["num_classes"]))


def create_exit(cfg: ExitConfig) -> ExitModule:
    return ExitModule(cfg.channels, cfg.width, cfg.num_classes, cfg.activation, cfg.kernel)


class EarlyExitNetwork(nn.Module):
    """A main network with one exit after block ``position`` (``models.split``: any network)."""

    def __init__(self, main: nn.Module, exit_cfg: ExitConfig, exit_module: nn.Module | None = None):
        super().__init__()
        self.main = main
        self.exit_cfg = exit_cfg
        self.position = exit_cfg.position
        self.exit = exit_module if exit_module is not None else create_exit(exit_cfg)

    def features(self, x):
        """The feature map at the exit point (stem and blocks 0..position)."""
        return split.features(self.main, x, self.position)

    def rest(self, h):
        """The main network's logits from the exit point on."""
        return split.rest(self.main, h, self.position)

    def both(self, x):
        """(exit logits, main logits) for every sample: the simulated evaluation."""
        h = self.features(x)
        return self.exit(h), self.rest(h)

    def forward(self, x):
        """The exit's logits (what exit training optimises)."""
        return self.exit(self.features(x))

    @torch.no_grad()
    def adaptive(self, x, threshold: float):
        """Real adaptive inference: the rest of the network runs only on the
        samples whose exit confidence is not above ``threshold``. Returns the
        logits used for each sample and the mask of samples that exited."""
        h = self.features(x)
        logits = self.exit(h)
        exited = F.softmax(logits.float(), dim=1).amax(1) > threshold
        stay = (~exited).nonzero().squeeze(1)
        if len(stay):
            logits = logits.clone()
            logits[stay] = self.rest(h[stay]).to(logits.dtype)
        return logits, exited


@torch.no_grad()
def adaptive_predictions(net: EarlyExitNetwork, x, data, threshold: float, batch_size: int) -> torch.Tensor:
    """Predicted labels of the real adaptive forward (the rest of the network only for samples that stay)."""
    net.eval()
    preds = [net.adaptive(normalized(chunk, data.mean, data.std), threshold)[0].argmax(1)
             for chunk in x.split(batch_size)]
    return torch.cat(preds)


def softsmoothing_loss(logits: torch.Tensor, targets: torch.Tensor, labels=None) -> torch.Tensor:
    """(1 + max softmax) x cross-entropy, per sample; the confidence is not
    detached, so the loss also pushes against over-confidence."""
    log_p = F.log_softmax(logits, dim=1)
    ce = -(targets * log_p).sum(1)
    conf = log_p.exp().amax(1)
    return ((1 + conf) * ce).mean()


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, labels=None) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


LOSS_FUNCTIONS = {"softsmoothing": softsmoothing_loss, "cross_entropy": cross_entropy_loss}


def simulate(exit_logits: torch.Tensor, main_logits: torch.Tensor, threshold: float):
    """Predictions and exit mask of the thresholded network, from cached logits."""
    conf, exit_pred = F.softmax(exit_logits.float(), dim=1).max(1)
    exited = conf > threshold
    return torch.where(exited, exit_pred, main_logits.argmax(1)), exited


@dataclass
class ExitCost:
    """The MicroNet cost of a network with one exit, at an exit ratio."""

    main_bytes: float
    exit_bytes: float
    full_ops: float
    path_ops: float
    exit_ops: float
    full_mults: float
    path_mults: float
    exit_mults: float
    full_adds: float
    path_adds: float
    exit_adds: float
    widths: BitWidths
    tree_ops: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (full, path, exit) under the adder-tree accounting

    def summary(self, ratio: float) -> dict:
        ops = expected_ops(self.full_ops, [(self.path_ops, self.exit_ops, ratio)])
        full_tree, path_tree, exit_tree = self.tree_ops
        ops_tree = expected_ops(full_tree, [(path_tree, exit_tree, ratio)])
        mults = expected_ops(self.full_mults, [(self.path_mults, self.exit_mults, ratio)])
        adds = expected_ops(self.full_adds, [(self.path_adds, self.exit_adds, ratio)])
        params_bytes = self.main_bytes + self.exit_bytes
        return {"params": params_bytes / 4, "params_mb": params_bytes / 1e6, "params_bytes": params_bytes,
                "ops": ops, "mults": mults, "adds": adds, "weight_bits": self.widths.weight,
                "act_bits": self.widths.act, "add_bits": self.widths.add,
                "params_score": params_bytes / REFERENCE_BYTES, "ops_score": ops / REFERENCE_OPS,
                "score": params_bytes / REFERENCE_BYTES + ops / REFERENCE_OPS, "exit_ratio": ratio,
                **tree_keys(params_bytes, ops_tree)}


def exit_cost(net: EarlyExitNetwork, input_shape, bits: int | BitWidths = 16,
              main_uniform_sparsity: float | None = None,
              exit_uniform_sparsity: float | None = None, exit_bits: int | BitWidths | None = None) -> ExitCost:
    """Count the main network (with its per-block cumulative costs) and the exit module once;
    the cost at any exit ratio follows without counting again. ``exit_bits``: the exit's
    widths when not ``bits`` (per-layer patterns name main-network layers)."""
    ends = [b.name for b in split.boundaries(net.main)]
    main = count(net.main, input_shape, bits=bits, uniform_sparsity=main_uniform_sparsity, boundaries=ends)
    block = {b.name: b for b in main.blocks}[ends[net.position]]
    cfg = net.exit_cfg
    ex = count(net.exit, (cfg.channels, cfg.size, cfg.size), bits=bits if exit_bits is None else exit_bits,
               uniform_sparsity=exit_uniform_sparsity)
    ms = main.summary()
    es = ex.summary()
    tree = (ms["ops_tree"], main.block_ops_at(block, "tree"), es["ops_tree"])
    return ExitCost(ms["params_bytes"], es["params_bytes"], ms["ops"], block.ops, es["ops"],
                    ms["mults"], block.mults, es["mults"], ms["adds"], block.adds, es["adds"], main.widths, tree)


def risk_coverage(logits: torch.Tensor, labels: torch.Tensor, points: int = 100):
    """Risk (error rate of the accepted samples) at coverages 1/points .. 1,
    accepting the most confident samples first, and the area under the
    curve (AURC, over every coverage level k/n)."""
    conf, pred = F.softmax(logits.float(), dim=1).max(1)
    order = torch.argsort(conf, descending=True, stable=True)
    errors = (pred[order] != labels[order]).double()
    n = len(labels)
    if n == 0:
        raise SipaError("risk-coverage: no samples")
    risk = errors.cumsum(0) / torch.arange(1, n + 1, dtype=torch.double)
    aurc = float(risk.mean())
    grid = [max(1, round(n * (i + 1) / points)) for i in range(points)]
    return [(k / n, float(risk[k - 1])) for k in grid], aurc
