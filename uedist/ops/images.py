"""Pixel conversions on the device: uint8 batches in, normalized float batches out (pure tensor functions)."""

from __future__ import annotations

from typing import Sequence

import torch

# Per-channel statistics on the [0, 1] scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float32 in [0, 1] (on x's device)."""
    return x.float().div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (x - mean) / std, per channel."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float (B, C, H, W) in [0, 1] -> uint8, rounded to the nearest level and clipped."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
