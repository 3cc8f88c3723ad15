"""The ResNet-50 pieces the peer detectors share (NPR, SAFE, FreqNet): bottleneck, stage, init."""

from __future__ import annotations

from typing import Final

import torch
from torch import nn


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck: 1x1 reduce, 3x3 (carries the stride), 1x1 expand x4, projected shortcut."""

    expansion: Final[int] = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


def resnet_stage(cin: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage: the first block changes width/stride, the rest keep it."""
    cout = planes * Bottleneck.expansion
    return nn.Sequential(Bottleneck(cin, planes, stride), *[Bottleneck(cout, planes) for _ in range(blocks - 1)])


def init_resnet(model: nn.Module) -> None:
    """torchvision's ResNet initialisation (He-normal convs, BN at identity)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
