"""Image shortcut squeezing (ISS, Liu et al. ICML 2023) and low-pass filters: the simple purifiers and
train-time defenses. Float (B, C, H, W) in [0, 1] in, same shape out; ``jpeg`` goes through Pillow (CPU)."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma replicated over 3 channels."""
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand_as(x).contiguous()


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-depth reduction to ``bits`` per channel (ISS uses 2)."""
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG compress + decompress each image at ``quality`` (ISS uses 10). Not differentiable."""
    u8 = x.detach().mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([jpeg_uint8(a, quality) for a in u8])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0


def jpeg_uint8(a: np.ndarray, quality: int) -> np.ndarray:
    """uint8 (H, W, 3) -> JPEG round trip at ``quality`` -> uint8 (H, W, 3)."""
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def mean_filter(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """k×k box filter, reflect padding."""
    c = x.shape[1]
    w = torch.full((c, 1, k, k), 1.0 / (k * k), dtype=x.dtype, device=x.device)
    return F.conv2d(F.pad(x, [k // 2] * 4, mode="reflect"), w, groups=c)


def gaussian_filter(x: torch.Tensor, k: int = 3, sigma: float = 0.8) -> torch.Tensor:
    """k×k Gaussian filter (σ = 0.8 for k = 3, OpenCV's default rule), reflect padding."""
    c = x.shape[1]
    r = torch.arange(k, dtype=x.dtype, device=x.device) - k // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(c, 1, k, k).contiguous()
    return F.conv2d(F.pad(x, [k // 2] * 4, mode="reflect"), w, groups=c)


def median_filter(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """k×k median filter, reflect padding."""
    b, c, h, w = x.shape
    patches = F.unfold(F.pad(x, [k // 2] * 4, mode="reflect"), k)  # (B, C*k*k, H*W)
    return patches.view(b, c, k * k, h * w).median(dim=2).values.view(b, c, h, w)
