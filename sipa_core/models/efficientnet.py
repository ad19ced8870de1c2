"""EfficientNet/MBConv networks built from block arguments and compound
scaling coefficients (width, depth, resolution)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from sipa_core.errors import SipaError
from sipa_core.models.blocks import BlockArgs, decode_blocks, round_filters, scale_blocks
from sipa_core.models.layers import ConvBNAct, SqueezeExcite, drop_connect, make_activation, same_padding


@dataclass(frozen=True)
class BlockInfo:
    """Where a block ends: the place an early exit can attach."""

    index: int
    out_channels: int
    out_size: int
    name: str


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> [SE] -> 1x1 project (+ residual)."""

    def __init__(self, args: BlockArgs, act: str, nominal: int, drop_rate: float, bn_eps: float,
                 bn_momentum: float, widths: dict | None = None):
        super().__init__()
        # ``widths`` (in/mid/se/out) replace the block arguments' channel counts
        # after filter pruning; the block's structure (kernel, stride, SE,
        # residual) still comes from the arguments.
        w = widths or {}
        in_ch = w.get("in", args.in_ch)
        mid = w.get("mid", in_ch if args.expand == 1 else args.in_ch * args.expand)
        out_ch = w.get("out", args.out_ch)
        bn = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        self.expand = ConvBNAct(in_ch, mid, 1, act=act, nominal=nominal, **bn) if args.expand != 1 else None
        self.depthwise = ConvBNAct(mid, mid, args.kernel, args.stride, groups=mid, act=act, nominal=nominal, **bn)
        # SE width from the block's *input* channels (the authors' choice), acting on the expanded tensor.
        self.se = (SqueezeExcite(mid, w.get("se", max(1, int(args.in_ch * args.se_ratio))), act)
                   if args.se_ratio else None)
        self.project = ConvBNAct(mid, out_ch, 1, act=None, nominal=math.ceil(nominal / args.stride), **bn)
        self.residual = args.skip and args.stride == 1 and args.in_ch == args.out_ch
        if self.residual and in_ch != out_ch:
            raise SipaError(f"architecture: a residual block needs as many output as input channels, "
                            f"got {in_ch} -> {out_ch}")
        self.drop_rate = drop_rate

    def widths(self) -> dict:
        """The block's actual channel counts (what filter pruning left)."""
        w = {"in": self.depthwise[0].in_channels if self.expand is None else self.expand[0].in_channels,
             "mid": self.depthwise[0].out_channels, "out": self.project[0].out_channels}
        if self.se is not None:
            w["se"] = self.se.reduce.out_channels
        return w

    def forward(self, x):
        out = x if self.expand is None else self.expand(x)
        out = self.depthwise(out)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        if self.residual:
            out = drop_connect(out, self.drop_rate, self.training) + x
        return out


def _conv_out(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _pytorch_init(model: nn.Module) -> None:
    """PyTorch's own defaults (each layer's ``reset_parameters``)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            m.reset_parameters()


def _efficientnet_init(model: nn.Module) -> None:
    """The EfficientNet reference's rule: conv weights He normal over fan-out per group (a depthwise
    kxk filter starts at std sqrt(2/k^2)), linear uniform over 1/sqrt(fan-in), zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (kh * kw * m.out_channels // m.groups)))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.weight.shape[1])
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


# Weight initialisation rules by name (the spec's ``init``). The default is PyTorch's: at short
# budgets it trained best of the rules measured (docs/results.md "Engine parity": 15 epochs on 5,000
# CIFAR-10 images, PyTorch's default several points above the reference rule).
INIT_RULES = {"pytorch": _pytorch_init, "efficientnet": _efficientnet_init}


class EfficientNet(nn.Module):
    """Upsample (nearest) -> stem -> MBConv blocks -> head -> pool -> dropout -> linear."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = dict(spec)
        act, bn = spec["activation"], dict(bn_eps=spec["bn_eps"], bn_momentum=spec["bn_momentum"])
        image = spec["image_size"]
        self.input_size = math.ceil(image * spec["resolution"])
        self.upsample = (nn.Upsample(size=(self.input_size, self.input_size), mode="nearest")
                         if self.input_size != image else nn.Identity())
        blocks = scale_blocks(decode_blocks(spec["blocks"]), spec["width"], spec["depth"])
        channels = spec.get("channels") or {}  # filter pruning's channel counts, by layer
        stem_ch = channels.get("stem", blocks[0].in_ch)
        nominal, size = image, self.input_size
        self.stem = ConvBNAct(3, stem_ch, 3, 2, act=act, nominal=nominal, **bn)
        size, nominal = _conv_out(size, 3, 2, same_padding(3, 2, nominal)), math.ceil(nominal / 2)
        if size < 1:
            raise SipaError(f"architecture: the stem leaves no pixels at input size {self.input_size}")

        total = sum(b.repeats for b in blocks)
        layers, infos, prev_out, prev_nominal = [], [], stem_ch, blocks[0].in_ch
        for stage in blocks:
            if stage.in_ch != prev_nominal:
                # Stages must chain: a mismatch is a malformed architecture, not something to guess around.
                raise SipaError(f"architecture: block {stage.encode()!r} takes {stage.in_ch} channels "
                                f"but the previous layer gives {prev_nominal} (after width scaling)")
            for r in range(stage.repeats):
                args = stage if r == 0 else BlockArgs(1, stage.kernel, 1, stage.expand, stage.out_ch,
                                                      stage.out_ch, stage.se_ratio, stage.skip)
                rate = spec["drop_connect"] * len(layers) / total
                widths = {"in": prev_out, **channels.get(f"blocks.{len(layers)}", {})}
                layers.append(MBConv(args, act, nominal, rate, **bn, widths=widths))
                prev_out = layers[-1].project[0].out_channels
                size = _conv_out(size, args.kernel, args.stride, same_padding(args.kernel, args.stride, nominal))
                nominal = math.ceil(nominal / args.stride)
                if size < 1:
                    raise SipaError(f"architecture: block {len(layers) - 1} ({stage.encode()}) leaves no "
                                    f"pixels at input size {self.input_size}; use fewer stride-2 blocks")
                infos.append(BlockInfo(len(layers) - 1, prev_out, size, f"blocks.{len(layers) - 1}"))
            prev_nominal = stage.out_ch
        self.blocks = nn.ModuleList(layers)
        self.block_info = tuple(infos)
        head_ch = channels.get("head", round_filters(spec["head"], spec["width"]))
        self.head = ConvBNAct(prev_out, head_ch, 1, act=act, nominal=nominal, **bn)
        self.dropout = nn.Dropout(spec["dropout"])
        self.classifier = nn.Linear(head_ch, spec["num_classes"])
        self.num_features = head_ch
        self.reset_parameters()

    def reset_parameters(self):
        """Initialise by the spec's ``init`` rule (``INIT_RULES``)."""
        INIT_RULES[self.spec.get("init", "pytorch")](self)

    def channel_counts(self) -> dict:
        """Every layer's channel count that differs from the unpruned spec's:
        the ``channels`` entry a filter-pruned network's spec carries."""
        plain = EfficientNet({**self.spec, "channels": None})
        out = {}
        if self.stem[0].out_channels != plain.stem[0].out_channels:
            out["stem"] = self.stem[0].out_channels
        for i, (mine, ref) in enumerate(zip(self.blocks, plain.blocks)):
            diff = {k: v for k, v in mine.widths().items() if k != "in" and ref.widths().get(k) != v}
            if diff:
                out[f"blocks.{i}"] = diff
        if self.head[0].out_channels != plain.head[0].out_channels:
            out["head"] = self.head[0].out_channels
        return out

    def boundaries(self) -> tuple[BlockInfo, ...]:
        """Block ends, in order: where an early exit can attach."""
        return self.block_info

    def forward_stem(self, x):
        return self.stem(self.upsample(x))

    def forward_blocks(self, x, start: int = 0, stop: int | None = None):
        """Run blocks[start:stop] on a feature map (lets exits split the network)."""
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def forward_head(self, x):
        x = self.head(x).mean((2, 3))
        return self.classifier(self.dropout(x))

    def forward(self, x):
        return self.forward_head(self.forward_blocks(self.forward_stem(x)))


def efficientnet_spec(blocks, *, width=1.0, depth=1.0, resolution=1.0, image_size=32, num_classes=100,
                      head=1280, activation="swish", dropout=0.2, drop_connect=0.2, bn_eps=1e-3,
                      bn_momentum=0.1, init="pytorch", name=None, channels=None) -> dict:
    """A complete, plain-data description of an EfficientNet-family network."""
    if isinstance(blocks, str):
        blocks = [blocks]
    spec = dict(family="efficientnet", name=name, blocks=[b.encode() for b in decode_blocks(blocks)],
                width=float(width), depth=float(depth), resolution=float(resolution),
                image_size=int(image_size), num_classes=int(num_classes), head=int(head),
                activation=activation, dropout=float(dropout), drop_connect=float(drop_connect),
                bn_eps=float(bn_eps), bn_momentum=float(bn_momentum), init=init)
    if init not in INIT_RULES:
        raise SipaError(f"architecture: init must be one of {', '.join(INIT_RULES)}, got {init!r}")
    if channels:
        spec["channels"] = _check_channels(channels)
    for key in ("width", "depth", "resolution"):
        if not spec[key] > 0:
            raise SipaError(f"architecture: {key} must be > 0, got {spec[key]}")
    if spec["image_size"] < 1 or spec["num_classes"] < 1 or spec["head"] < 1:
        raise SipaError("architecture: image_size, num_classes and head must be positive")
    if not 0 <= spec["dropout"] < 1 or not 0 <= spec["drop_connect"] < 1:
        raise SipaError("architecture: dropout and drop_connect must be in [0, 1)")
    make_activation(activation)  # fails early on an unknown name
    return spec


def _check_channels(channels) -> dict:
    """Validate a filter-pruned network's channel counts (stem, head, blocks.i: in/mid/se/out)."""
    if not isinstance(channels, dict):
        raise SipaError("architecture: channels must be a mapping of layer to channel count")
    out = {}
    for key, value in channels.items():
        if key in ("stem", "head"):
            if not isinstance(value, int) or value < 1:
                raise SipaError(f"architecture: channels.{key} must be a positive integer, got {value!r}")
            out[key] = value
        elif isinstance(key, str) and key.startswith("blocks.") and key[7:].isdigit() and isinstance(value, dict):
            bad = [k for k, v in value.items() if k not in ("mid", "se", "out") or not isinstance(v, int) or v < 1]
            if bad:
                raise SipaError(f"architecture: channels.{key}.{bad[0]} must be one of mid/se/out "
                                f"with a positive integer")
            out[key] = dict(value)
        else:
            raise SipaError(f"architecture: unknown channels entry {key!r} (stem, head or blocks.N)")
    return out
