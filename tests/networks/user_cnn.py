"""A user's own networks for the tests: one the counter counts, one it cannot."""

import torch
import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)  # an attribute, not in a Sequential with its conv
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x + F.interpolate(torch.relu(self.bn3(self.conv3(x))), scale_factor=2.0)
        return self.fc(x.mean((2, 3)))


class Uncountable(TinyCNN):
    def forward(self, x):
        return super().forward(x).cumsum(1)  # no MicroNet counting rule


def build(num_classes: int, width: int = 8) -> nn.Module:
    return TinyCNN(num_classes, width)


def build_uncountable(num_classes: int) -> nn.Module:
    return Uncountable(num_classes)


def build_not_a_module(num_classes: int):
    return "a network"
