"""The ResNets' building blocks: torchvision's BasicBlock and Bottleneck (v1.5), under torchvision's module names,
and the size arithmetic of their convs. The architectures that stack them are in starvation/networks.py."""

from __future__ import annotations

import torch
from torch import nn

RESNET_MIN_SIZE = 8  # pixels a side at least: 2x2 after the stem, 1x1 from layer2 on (CMNIST's 14x14 fits)
MAX_RESNET_WIDTH = 256  # channels of the stem and layer1 (torchvision: 64); MAX_PARAMETERS bounds the total too


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs (the first strided) with BatchNorm, plus the shortcut."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    @staticmethod
    def convs(inplanes: int, planes: int, stride: int) -> list[tuple[int, int, int, int]]:
        """(in channels, out channels, kernel, stride of its output w.r.t. the block's input) of each conv but
        the shortcut's, in order."""
        return [(inplanes, planes, 3, stride), (planes, planes, 3, stride)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride on the 3x3 conv): 1x1, 3x3, 1x1 to 4x the planes."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    @staticmethod
    def convs(inplanes: int, planes: int, stride: int) -> list[tuple[int, int, int, int]]:
        out = planes * Bottleneck.expansion
        return [(inplanes, planes, 1, 1), (planes, planes, 3, stride), (planes, out, 1, stride)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def strided(size: int, stride: int) -> int:
    """A side after a conv or max-pool of this stride with 'same' padding (7x7 p3, 3x3 p1, 1x1 p0)."""
    return (size - 1) // stride + 1
