"""WideResNet (pre-activation), the MicroNet challenge's reference network."""

from __future__ import annotations

from torch import nn

from sipa_core.errors import SipaError
from sipa_core.models.layers import ACTIVATIONS, make_activation


class PreActBlock(nn.Module):
    def __init__(self, in_ch, out_ch, stride, dropout, activation="relu"):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = make_activation(activation)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
                         if stride != 1 or in_ch != out_ch else None)

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(self.relu2(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.spec = dict(spec)
        depth, k = spec["depth"], spec["widen"]
        if (depth - 4) % 6:
            raise SipaError(f"architecture: WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, in_ch = [], widths[0]
        for g, out_ch in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(PreActBlock(in_ch, out_ch, 2 if (g > 0 and i == 0) else 1, spec["dropout"],
                                          spec["activation"]))
                in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = make_activation(spec["activation"])
        self.classifier = nn.Linear(in_ch, spec["num_classes"])
        self.input_size = spec["image_size"]

    def forward(self, x):
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = self.relu(self.bn(x)).mean((2, 3))
        return self.classifier(x)


def wrn_spec(depth=28, widen=10, num_classes=100, dropout=0.0, image_size=32, activation="relu", name=None) -> dict:
    if activation not in ACTIVATIONS:
        raise SipaError(f"architecture (wrn): activation {activation!r} is not one of {', '.join(sorted(ACTIVATIONS))}")
    return dict(family="wrn", name=name, depth=int(depth), widen=int(widen), num_classes=int(num_classes),
                dropout=float(dropout), image_size=int(image_size), activation=activation)
