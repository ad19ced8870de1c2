"""An example of your own network for sipa: a small residual CNN for 32 px images.

Name it in the params as ``networks/example_cnn.py:build`` (``search.preset``
with ``search.method: preset``, or ``improve.arch``), with keyword arguments
in brackets: ``networks/example_cnn.py:build(width=24)``. sipa calls
``build(num_classes, **kwargs)`` and needs an ``nn.Module`` back; the
networks/ folder is a DVC dependency of every stage that builds a network.
"""

from torch import nn


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))


class Residual(nn.Module):
    """Two 3x3 convolutions with an identity (or strided 1x1) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, stride)
        self.act1 = nn.ReLU()
        self.conv2 = conv_bn(c_out, c_out)
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))
        self.act2 = nn.ReLU()

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))) + self.shortcut(x))


class ExampleCNN(nn.Module):
    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width), nn.ReLU())
        self.stage1 = Residual(width, width, 1)
        self.stage2 = Residual(width, 2 * width, 2)
        self.stage3 = Residual(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.classifier(self.pool(x).flatten(1))


def build(num_classes: int, width: int = 16) -> nn.Module:
    return ExampleCNN(num_classes, width)
