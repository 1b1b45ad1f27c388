"""VGG-16 with batch norm (Simonyan & Zisserman, ICLR 2015): torchvision's ``vgg16_bn`` and the CIFAR variant.

    model = MODELS.build("vgg16", num_classes=10)
    logits = model(x)  # x: (B, in_channels, H, W) normalized float, H, W >= 32 -> (B, num_classes)

Parameter counts: 138,365,992 with the ImageNet head and 1000 classes (torchvision ``vgg16_bn``); 14,728,266 with
the CIFAR head and 10 classes (kuangliu/pytorch-cifar ``VGG('VGG16')``); 15,253,578 for ``vgg16_mlp``, the SEM/REM
reference victim (CausalLearning/robust-unlearnable-examples models/vgg.py: global pool, then Dropout-Linear(512,
512)-ReLU-Dropout-Linear(512, 512)-ReLU-Linear(512, classes), dropout 0.5).
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn as nn

from uedist.models.common import check_stem, scaled
from uedist.registry import MODELS

# Configuration "D": conv widths, "M" = 2x2 max-pool.
VGG16: Sequence[Union[int, str]] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG(nn.Module):
    """conv3x3-BN-ReLU stacks with max-pools, then a head.

    ``stem="imagenet"``: adaptive average pool to 7x7 and the 4096-4096 classifier with dropout 0.5
    (torchvision). ``stem="cifar"``: global average pool and one Linear(512·width, num_classes) (kuangliu; at
    32 px the features are already 1x1). The convolutions are the same for both. ``width`` scales every conv
    width and the 4096 hidden units.
    """

    def __init__(
        self,
        cfg: Sequence[Union[int, str]] = VGG16,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        stem: str = "cifar",
        width: float = 1.0,
        dropout: float = 0.5,
        mlp_head: bool = False,
    ) -> None:
        super().__init__()
        check_stem(stem)
        layers: List[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, stride=2))
            else:
                out = scaled(int(v), width)
                layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        if stem == "imagenet":
            hidden = scaled(4096, width)
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(7)
            self.classifier: nn.Module = nn.Sequential(
                nn.Linear(c * 7 * 7, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        elif mlp_head:  # the SEM/REM reference's CIFAR head
            hidden = scaled(512, width)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(c, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes),
            )
        else:
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(c, num_classes)

        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) normalized float -> (B, num_classes) logits."""
        out = self.pool(self.features(x)).flatten(1)  # (B, C·7·7) or (B, C)
        return self.classifier(out)


@MODELS.register("vgg16")
def vgg16(
    num_classes: int = 10, *, in_channels: int = 3, stem: str = "cifar", width: float = 1.0, dropout: float = 0.5
) -> VGG:
    """VGG-16 with batch norm; ``dropout`` applies to the ImageNet classifier only."""
    return VGG(VGG16, num_classes, in_channels=in_channels, stem=stem, width=width, dropout=dropout)


@MODELS.register("vgg16_mlp")
def vgg16_mlp(
    num_classes: int = 10, *, in_channels: int = 3, stem: str = "cifar", width: float = 1.0, dropout: float = 0.5
) -> VGG:
    """VGG-16 with batch norm and the SEM/REM reference's 512-512 MLP head with dropout (15,253,578 parameters
    at 10 classes, CIFAR stem); with ``stem="imagenet"`` it is ``vgg16``'s ImageNet model."""
    return VGG(VGG16, num_classes, in_channels=in_channels, stem=stem, width=width, dropout=dropout, mlp_head=True)
