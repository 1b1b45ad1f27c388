"""ResNet-18 / ResNet-50 (He et al. 2016) with a CIFAR or an ImageNet stem and a width multiplier.

``stem="cifar"``: 3×3 stride-1 conv + BN, no max-pool (kuangliu/pytorch-cifar, the surrogate and victim of every
CIFAR result of the SEM, REM, D-VAE and LE papers; the reference REM/SEM code keeps it even at 224 px).
``stem="imagenet"``: 7×7 stride-2 conv + BN + 3×3 stride-2 max-pool (torchvision). Parameter counts at width 1:
ResNet-18 CIFAR 10 classes 11,173,962; ImageNet 1000 classes 11,689,512; ResNet-50 CIFAR 23,520,842, ImageNet
25,557,032.

    model = MODELS.build("resnet18", num_classes=100, stem="imagenet", width=0.5)
    logits = model(x)  # x: (B, in_channels, H, W) normalized float -> (B, num_classes)
"""

from __future__ import annotations

from typing import List, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from uedist.models.common import StridedPointwise, check_stem, scaled
from uedist.registry import MODELS


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(StridedPointwise(in_planes, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)  # stride on the 3x3 (v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(StridedPointwise(in_planes, out, stride), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        layers: List[int],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        stem: str = "cifar",
        width: float = 1.0,
    ) -> None:
        super().__init__()
        check_stem(stem)
        c0 = scaled(64, width)
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, c0, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(c0),
                nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, c0, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(c0),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        self.in_planes = c0
        stages = []
        for i, (n, base) in enumerate(zip(layers, (64, 128, 256, 512))):
            stages.append(self._stage(block, scaled(base, width), n, stride=1 if i == 0 else 2))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, n: int, *, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))  # (B, C, H/8 or H/32, ...)
        return self.fc(torch.flatten(self.pool(x), 1))


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, *, in_channels: int = 3, stem: str = "cifar", width: float = 1.0) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, stem=stem, width=width)


@MODELS.register("resnet50")
def resnet50(num_classes: int = 10, *, in_channels: int = 3, stem: str = "cifar", width: float = 1.0) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, stem=stem, width=width)
