"""Wrap a classifier so it takes images in [0, 1]: normalization becomes part of the model, so attacks (PGD,
noise generation) work in pixel space and the data path stays uint8 until the device."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalized(nn.Module):
    """``forward(x)`` = ``net((x - mean) / std)`` for x (B, C, H, W) in [0, 1]."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
