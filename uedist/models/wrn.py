"""Wide residual networks (Zagoruyko & Komodakis, BMVC 2016) with pre-activation blocks.

Layer for layer the WideResNet of the TRADES / MART adversarial-training code (``models/wideresnet.py``), the
usual WRN-34-10 victim in the unlearnable-examples literature, minus that file's ``sub_block1``: a fourth group
that is built but never called in ``forward``, so its 2,102,112 parameters (at WRN-34-10) never get a gradient.
WRN-34-10 with 10 classes has 46,160,474 parameters here, the figure usually quoted (46.16 M); the TRADES
module itself reports 48,262,586 because it counts the dead group.

    model = MODELS.build("wrn34_10", num_classes=10)
    logits = model(x)  # x: (B, in_channels, H, W) normalized float, H, W >= 32 -> (B, num_classes)

``wrn34_10_post`` is the post-activation WRN-34-10 of the SEM/REM reference victims (SEM Table 3): a stem
conv-BN-ReLU, blocks conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv + BN where the shape changes), then ReLU; no
final BN; 46,162,714 parameters at 10 classes.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from uedist.models.common import StridedPointwise, check_stem, scaled
from uedist.registry import MODELS


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut, TRADES's ``BasicBlock``.

    When the widths differ, the pre-activated input feeds both the residual branch and the 1x1 projection
    shortcut (as in the reference); when they match, the raw input is the shortcut.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, *, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = StridedPointwise(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu(inplace) acts on BN outputs, never on x itself, so input gradients stay intact.
        a = F.relu(self.bn1(x), inplace=True)
        out = F.relu(self.bn2(self.conv1(a)), inplace=True)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(a))


class PostActBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, *, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.drop_rate = drop_rate
        self.shortcut: nn.Module = nn.Identity()
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Sequential(StridedPointwise(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: a stem conv, three groups of (depth-4)/6 blocks, BN-ReLU, global pool, fc.

    Widths are 16, 16k, 32k, 64k (k = widen_factor), each times ``width``. The groups stride 1, 2, 2.

    Stems: ``"cifar"`` is the reference 3x3 stride-1 conv (32 px -> 32, 16, 8 in the groups). ``"imagenet"`` is
    a 3x3 stride-2 conv then a 3x3 stride-2 max-pool, so 224 px enters the groups at 56 px as in ResNet's
    ImageNet stem (56, 28, 14). The conv stays 3x3 and bare (no BN-ReLU) because WRN has no ImageNet stem of
    its own to copy, and every pre-activation block normalises its input first; the parameter count is thus
    the same for both stems.
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        stem: str = "cifar",
        width: float = 1.0,
        drop_rate: float = 0.0,
        post_activation: bool = False,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        check_stem(stem)
        n = (depth - 4) // 6
        chans = [scaled(c, width) for c in (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)]
        stride0 = 1 if stem == "cifar" else 2
        conv0 = nn.Conv2d(in_channels, chans[0], 3, stride=stride0, padding=1, bias=False)
        layers: List[nn.Module] = [conv0] + ([nn.BatchNorm2d(chans[0]), nn.ReLU()] if post_activation else [])
        if stem != "cifar":
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        block = PostActBlock if post_activation else PreActBlock
        groups: List[nn.Module] = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [
                block(chans[i] if j == 0 else chans[i + 1], chans[i + 1], stride if j == 0 else 1, drop_rate=drop_rate)
                for j in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn: nn.Module = nn.Identity() if post_activation else nn.BatchNorm2d(chans[3])
        self.fc = nn.Linear(chans[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # N(0, 2 / (k*k*out)), the reference init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) normalized float -> (B, num_classes) logits."""
        out = self.block3(self.block2(self.block1(self.stem(x))))
        out = out if isinstance(self.bn, nn.Identity) else F.relu(self.bn(out), inplace=True)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 64k·width)
        return self.fc(out)


def wrn(
    depth: int = 34,
    widen_factor: int = 10,
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    stem: str = "cifar",
    width: float = 1.0,
    drop_rate: float = 0.0,
) -> WideResNet:
    """Any WRN-depth-k; the registered names below fix depth and k."""
    return WideResNet(
        depth, widen_factor, num_classes, in_channels=in_channels, stem=stem, width=width, drop_rate=drop_rate
    )


@MODELS.register("wrn34_10")
def wrn34_10(
    num_classes: int = 10, *, in_channels: int = 3, stem: str = "cifar", width: float = 1.0, drop_rate: float = 0.0
) -> WideResNet:
    """WRN-34-10, the adversarial-training victim (46,160,474 parameters at 10 classes)."""
    return wrn(34, 10, num_classes, in_channels=in_channels, stem=stem, width=width, drop_rate=drop_rate)


@MODELS.register("wrn34_10_post")
def wrn34_10_post(
    num_classes: int = 10, *, in_channels: int = 3, stem: str = "cifar", width: float = 1.0, drop_rate: float = 0.0
) -> WideResNet:
    """Post-activation WRN-34-10, the SEM/REM reference victim (46,162,714 parameters at 10 classes)."""
    return WideResNet(
        34, 10, num_classes, in_channels=in_channels, stem=stem, width=width, drop_rate=drop_rate, post_activation=True
    )


@MODELS.register("wrn28_10")
def wrn28_10(
    num_classes: int = 10, *, in_channels: int = 3, stem: str = "cifar", width: float = 1.0, drop_rate: float = 0.0
) -> WideResNet:
    """WRN-28-10 of the WRN paper (36,479,194 parameters at 10 classes)."""
    return wrn(28, 10, num_classes, in_channels=in_channels, stem=stem, width=width, drop_rate=drop_rate)
