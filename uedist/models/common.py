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
    ``nn.Conv2d``). Why: torch 2.13's CPU (oneDNN) backward of a *strided* 1×1 convolution on channels_last
    input corrupts the heap (``double free or corruption``, rc 134/139) when the input has 8 channels — e.g. the
    ResNet / WRN / D-VAE shortcuts at width 1/8. Smallest trigger measured on an AMD EPYC (AVX512-BF16):
    ``nn.Conv2d(8, 16, 1, stride=2)``, input (3, 8, 16, 16) channels_last, fp32, 2 threads (odd batches: 3, 5,
    7); with 1 thread, bf16 autocast at an even side >= 112. NCHW, 16 input channels, or stride 1: no crash.
    ``tests/test_models.py`` runs those shapes in a subprocess."""

    def __init__(self, cin: int, cout: int, stride: int, *, bias: bool = False) -> None:
        super().__init__(cin, cout, 1, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride[0]
        return F.conv2d(x[:, :, ::s, ::s] if s > 1 else x, self.weight, self.bias)
