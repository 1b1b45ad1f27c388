"""MobileNetV2 (Sandler et al., CVPR 2018): torchvision's ``mobilenet_v2`` blocks, with an ImageNet or CIFAR stem.

    model = MODELS.build("mobilenetv2", num_classes=10)
    logits = model(x)  # x: (B, in_channels, H, W) normalized float, H, W >= 32 -> (B, num_classes)

Parameter counts: 3,504,872 at 1000 classes (torchvision), 2,236,682 at 10 classes; the stem changes strides
only. kuangliu/pytorch-cifar's CIFAR ``MobileNetV2`` has 2,296,922 at 10 classes because its blocks differ from
the paper (a 1x1 expansion even at t=1, and 1x1 projection shortcuts on stride-1 blocks that change width);
these are the paper's / torchvision's blocks with kuangliu's CIFAR strides.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from uedist.models.common import check_stem, scaled
from uedist.registry import MODELS

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn(cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: List[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))  # on BN output: safe for input gradients
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6 when t > 1] - depthwise 3x3-BN-ReLU6 - 1x1 project-BN (linear), residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, *, expand: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand))
        layers: List[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers += [_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Stem conv3x3 (32), the 17 inverted-residual blocks, conv1x1 (1280), global pool, dropout, linear.

    ``stem="imagenet"``: first conv stride 2 (torchvision, 224 px -> 7x7). ``stem="cifar"``: first conv and the
    second stage (t=6, c=24) stride 1 (kuangliu/pytorch-cifar, 32 px -> 4x4). ``width`` scales every channel
    count including the last 1280 (torchvision keeps 1280 below width 1 and rounds to multiples of 8; at width
    1 both agree).
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        stem: str = "cifar",
        width: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        check_stem(stem)
        cifar = stem == "cifar"
        c = scaled(32, width)
        layers: List[nn.Module] = [_conv_bn(in_channels, c, 3, stride=1 if cifar else 2)]
        for i, (t, cout, n, s) in enumerate(SETTINGS):
            cout = scaled(cout, width)
            s = 1 if cifar and i == 1 else s
            for j in range(n):
                layers.append(InvertedResidual(c, cout, s if j == 0 else 1, expand=t))
                c = cout
        last = scaled(1280, width)
        layers.append(_conv_bn(c, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) normalized float -> (B, num_classes) logits."""
        out = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)  # (B, 1280·width)
        return self.classifier(out)


@MODELS.register("mobilenetv2")
def mobilenetv2(
    num_classes: int = 10, *, in_channels: int = 3, stem: str = "cifar", width: float = 1.0, dropout: float = 0.2
) -> MobileNetV2:
    """MobileNetV2 (width multiplier 1.0 = 3.5 M parameters at 1000 classes)."""
    return MobileNetV2(num_classes, in_channels=in_channels, stem=stem, width=width, dropout=dropout)
