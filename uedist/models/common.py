"""What every model builder shares: the stem names and the width multiplier."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

STEMS = ("cifar", "imagenet")


def scaled(c: float, width: float) -> int:
    """Channel count ``c`` scaled by the width multiplier, rounded, at least 1."""
    return max(1, int(round(c * width)))


def check_stem(stem: str) -> None:
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; expected one of {STEMS}")


class StridedPointwise(nn.Conv2d):
    """A 1×1 convolution with stride ``s`` (no padding), computed as the stride-``s`` subsample followed by a
    stride-1 1×1 convolution: the same function and the same parameters (state-dict compatible with
    ``nn.Conv2d``). Why: on AVX512-BF16 CPUs, torch 2.13's oneDNN backward of a strided 1×1 convolution under
    bf16 autocast with channels_last inputs corrupts the heap (``double free or corruption``) when the input has
    ≤ 8 channels and an even side ≥ 112 (e.g. ResNet / D-VAE shortcuts at width 1/8), killing the process."""

    def __init__(self, cin: int, cout: int, stride: int, *, bias: bool = False) -> None:
        super().__init__(cin, cout, 1, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride[0]
        return F.conv2d(x[:, :, ::s, ::s] if s > 1 else x, self.weight, self.bias)
