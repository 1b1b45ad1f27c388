"""DenseNet-BC (Huang et al., CVPR 2017): torchvision's ``densenet121`` layer for layer, plus a CIFAR stem.

    model = MODELS.build("densenet121", num_classes=10)
    logits = model(x)  # x: (B, in_channels, H, W) normalized float, H, W >= 32 -> (B, num_classes)

Parameter counts: 7,978,856 with the ImageNet stem and 1000 classes (torchvision); 6,956,298 with the CIFAR
stem and 10 classes (kuangliu/pytorch-cifar ``DenseNet121``, whose stem is a bare 3x3 conv).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from uedist.models.common import check_stem, scaled
from uedist.registry import MODELS


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(bn_size·growth)-BN-ReLU-conv3x3(growth) on the concatenation of all earlier features."""

    def __init__(self, in_features: int, growth: int, *, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.conv1 = nn.Conv2d(in_features, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(feats, 1)  # (B, in_features, H, W)
        out = self.conv1(F.relu(self.norm1(x), inplace=True))
        out = self.conv2(F.relu(self.norm2(out), inplace=True))  # (B, growth, H, W)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseBlock(nn.ModuleList):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self:
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (compresses channels) then 2x2 average pooling."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_features),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_features, out_features, 1, bias=False),
            nn.AvgPool2d(2, stride=2),
        )


class DenseNet(nn.Module):
    """Stem, dense blocks joined by transitions, final BN-ReLU, global average pool, linear classifier.

    Stems: ``"imagenet"`` is torchvision's conv7x7/2-BN-ReLU-maxpool3x3/2; ``"cifar"`` is a bare 3x3 stride-1
    conv as in kuangliu/pytorch-cifar (the first dense layer normalises its input anyway). ``width`` scales
    ``growth_rate`` and ``init_features``; the rest follows from them.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        *,
        init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        stem: str = "cifar",
        width: float = 1.0,
    ) -> None:
        super().__init__()
        check_stem(stem)
        growth, nf = scaled(growth_rate, width), scaled(init_features, width)
        if stem == "cifar":
            self.stem: nn.Module = nn.Conv2d(in_channels, nf, 3, stride=1, padding=1, bias=False)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, nf, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(nf),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        stages: List[nn.Module] = []
        for i, n_layers in enumerate(block_config):
            stages.append(
                DenseBlock(
                    DenseLayer(nf + j * growth, growth, bn_size=bn_size, drop_rate=drop_rate) for j in range(n_layers)
                )
            )
            nf += n_layers * growth
            if i != len(block_config) - 1:
                out = max(1, int(nf * compression))  # floor, as torchvision (num_features // 2)
                stages.append(Transition(nf, out))
                nf = out
        self.features = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(nf)
        self.classifier = nn.Linear(nf, num_classes)

        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) normalized float -> (B, num_classes) logits."""
        out = F.relu(self.norm(self.features(self.stem(x))), inplace=True)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, C)
        return self.classifier(out)


@MODELS.register("densenet121")
def densenet121(
    num_classes: int = 10, *, in_channels: int = 3, stem: str = "cifar", width: float = 1.0, drop_rate: float = 0.0
) -> DenseNet:
    """DenseNet-121: growth 32, blocks (6, 12, 24, 16), bn_size 4, compression 0.5, 64 initial features."""
    return DenseNet(
        32,
        (6, 12, 24, 16),
        init_features=64,
        bn_size=4,
        compression=0.5,
        drop_rate=drop_rate,
        num_classes=num_classes,
        in_channels=in_channels,
        stem=stem,
        width=width,
    )
