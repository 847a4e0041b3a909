"""Tiny builtin models for the digits dataset and fast tests.

Every layer is a named attribute used by attribute in `forward`, with no in-place ops and no hard-coded
flatten sizes, so structured pruning can shrink channels and a stage can swap a layer (e.g. `fc1` for a
low-rank Sequential) without touching the forward code.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def digits_mlp(
    num_classes: int = 10, hidden: int = 500, in_features: int = 64, dropout: float = 0.0
) -> nn.Module:
    """The classic two-layer MLP: flatten -> fc1 -> relu -> fc2."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        flatten=nn.Flatten(), fc1=nn.Linear(in_features, hidden), relu=nn.ReLU()
    )
    if dropout > 0:
        layers["dropout"] = nn.Dropout(dropout)  # no parameters: state_dict keys do not change
    layers["fc2"] = nn.Linear(hidden, num_classes)
    return nn.Sequential(layers)


class DigitsCNN(nn.Module):
    """Two conv+BN blocks, a 2x2 max-pool and two linear layers; BN gives pruning criteria to work with."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        hidden: int = 128,
        image_size: int = 8,
    ):
        super().__init__()
        self.c1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        pooled = image_size // 2
        self.fc1 = nn.Linear(2 * width * pooled * pooled, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.c1(x)))
        x = self.pool(self.relu2(self.bn2(self.c2(x))))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu3(self.fc1(x)))


def digits_cnn(
    num_classes: int = 10, in_channels: int = 1, width: int = 32, hidden: int = 128, image_size: int = 8
) -> nn.Module:
    """A small CNN for (N, 1, 8, 8) digits; `image_size` sizes fc1 for other square inputs."""
    return DigitsCNN(num_classes, in_channels, width, hidden, image_size)


class BasicBlock(nn.Module):
    """ResNet's basic block; a 1x1 conv+BN downsample when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class TinyResNet(nn.Module):
    """Stem, one identity block, one strided block with a downsample, global pool, `fc`."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_resnet(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    """A residual CNN small enough for fast tests of residual-aware pruning; any input size."""
    return TinyResNet(num_classes, in_channels, width)
