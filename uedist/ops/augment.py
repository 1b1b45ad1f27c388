"""Batched, on-device, differentiable augmentations (pure tensor functions).

Randomness comes from an explicit ``torch.Generator`` (on the CPU; parameters are drawn there and moved), so a
training run's augmentation stream is part of its checkpoint and resumes exactly. Every op is differentiable
w.r.t. ``x`` (crops are gathers, resized crops are ``grid_sample``), as EOT in REM/SEM needs.
Images are float (B, C, H, W) in [0, 1] unless said otherwise.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def _rand(gen: Optional[torch.Generator], *shape: int) -> torch.Tensor:
    """Uniform draws on the generator's device (a CUDA generator draws on the GPU: no host RNG, no copy)."""
    return torch.rand(*shape, generator=gen, device=gen.device if gen is not None else None)


def random_crop_flip(
    x: torch.Tensor, *, pad: int = 4, flip: bool = True, gen: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Random crop of the zero-padded image back to (H, W), then horizontal flip with p=0.5 (CIFAR standard)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    dy = (_rand(gen, b) * (2 * pad + 1)).long().clamp_(max=2 * pad).to(x.device)
    dx = (_rand(gen, b) * (2 * pad + 1)).long().clamp_(max=2 * pad).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)[None]  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)[None]  # (B, W)
    if flip:
        f = (_rand(gen, b) < 0.5).to(x.device)
        cols = torch.where(f[:, None], cols.flip(1), cols)
    idx_r = rows[:, None, :, None].expand(b, x.shape[1], h, xp.shape[3])
    out = xp.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, idx_c)


def _rrc_boxes(
    b: int, h: int, w: int, *, scale: Tuple[float, float], ratio: Tuple[float, float], gen: Optional[torch.Generator]
) -> torch.Tensor:
    """(B, 4) boxes (cy, cx, hh, hw) in [-1, 1] units, torchvision's RandomResizedCrop rule with 10 tries."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    boxes = torch.empty(b, 4)
    for i in range(b):
        for _ in range(10):
            target = area * (scale[0] + (scale[1] - scale[0]) * float(_rand(gen, 1)))
            ar = math.exp(log_r[0] + (log_r[1] - log_r[0]) * float(_rand(gen, 1)))
            cw, ch = round(math.sqrt(target * ar)), round(math.sqrt(target / ar))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(_rand(gen, 1) * (h - ch + 1))
                left = int(_rand(gen, 1) * (w - cw + 1))
                break
        else:  # fall back to a centre crop at the clamped aspect ratio
            in_r = w / h
            cw, ch = (
                (w, round(w / ratio[0]))
                if in_r < ratio[0]
                else ((round(h * ratio[1]), h) if in_r > ratio[1] else (w, h))
            )
            top, left = (h - ch) // 2, (w - cw) // 2
        boxes[i] = torch.tensor([(top + ch / 2) / h * 2 - 1, (left + cw / 2) / w * 2 - 1, ch / h, cw / w])
    return boxes


def _rrc_boxes_batched(
    b: int, h: int, w: int, *, scale: Tuple[float, float], ratio: Tuple[float, float], gen: torch.Generator
) -> torch.Tensor:
    """:func:`_rrc_boxes`'s rule with all 10 tries of every image drawn at once on the generator's device (no
    host sync): each image takes its first valid try, else the same centre-crop fallback. Used for generators
    off the CPU; a CPU generator keeps the per-image loop (and its exact stream)."""
    dev = gen.device
    u = torch.rand(4, b, 10, generator=gen, device=dev, dtype=torch.float64)
    area = h * w
    target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
    ar = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    cw, ch = torch.round(torch.sqrt(target * ar)), torch.round(torch.sqrt(target / ar))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1, device=dev))
    pick = first.clamp(min=0)[:, None]
    cw, ch = cw.gather(1, pick)[:, 0], ch.gather(1, pick)[:, 0]
    top = torch.floor(u[2].gather(1, pick)[:, 0] * (h - ch + 1))
    left = torch.floor(u[3].gather(1, pick)[:, 0] * (w - cw + 1))
    in_r = w / h
    fw, fh = (w, round(w / ratio[0])) if in_r < ratio[0] else ((round(h * ratio[1]), h) if in_r > ratio[1] else (w, h))
    none = first < 0
    cw, ch = torch.where(none, float(fw), cw), torch.where(none, float(fh), ch)
    top = torch.where(none, float((h - fh) // 2), top)
    left = torch.where(none, float((w - fw) // 2), left)
    boxes = torch.stack([(top + ch / 2) / h * 2 - 1, (left + cw / 2) / w * 2 - 1, ch / h, cw / w], 1)
    return boxes.float()


def random_resized_crop_flip(
    x: torch.Tensor,
    size: int,
    *,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    gen: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """RandomResizedCrop(size) + horizontal flip, batched via one ``grid_sample`` (bilinear).
    (B, C, H, W) -> (B, C, size, size)."""
    b, c, h, w = x.shape
    on_host = gen is None or gen.device.type == "cpu"
    boxes = (_rrc_boxes if on_host else _rrc_boxes_batched)(b, h, w, scale=scale, ratio=ratio, gen=gen)
    sign = torch.where(_rand(gen, b) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=boxes.device)
    theta = torch.zeros(b, 2, 3, device=boxes.device)
    theta[:, 0, 0] = boxes[:, 3] * sign  # x scale (negative = flip)
    theta[:, 0, 2] = boxes[:, 1]
    theta[:, 1, 1] = boxes[:, 2]
    theta[:, 1, 2] = boxes[:, 0]
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop to (size, size) (e.g. 256 -> 224 for ImageNet-100 evaluation)."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def cutout(x: torch.Tensor, *, length: int, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """Zero one ``length``×``length`` square per image at a random centre (DeVries & Taylor 2017)."""
    b, _, h, w = x.shape
    cy = (_rand(gen, b) * h).long().to(x.device)
    cx = (_rand(gen, b) * w).long().to(x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    y0 = cy[:, None, None] - length // 2  # the reference window [c - L/2, c - L/2 + L), clipped at the border
    x0 = cx[:, None, None] - length // 2
    inside = (ys >= y0) & (ys < y0 + length) & (xs >= x0) & (xs < x0 + length)
    return x * (~inside)[:, None].to(x.dtype)


def mixup(
    x: torch.Tensor, y_onehot: torch.Tensor, *, alpha: float = 1.0, gen: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): one λ ~ Beta(α, α) per batch, mixed with a random permutation of it."""
    lam = _beta(alpha, gen)
    perm = torch.randperm(x.shape[0], generator=gen, device=gen.device if gen is not None else None).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y_onehot + (1 - lam) * y_onehot[perm]


def cutmix(
    x: torch.Tensor, y_onehot: torch.Tensor, *, alpha: float = 1.0, gen: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al. 2019): paste a random box from a permuted batch; labels mixed by the box's area."""
    b, _, h, w = x.shape
    lam = _beta(alpha, gen)
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(_rand(gen, 1) * h), int(_rand(gen, 1) * w)
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    perm = torch.randperm(b, generator=gen, device=gen.device if gen is not None else None).to(x.device)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam_adj = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return out, lam_adj * y_onehot + (1 - lam_adj) * y_onehot[perm]


def _beta(alpha: float, gen: Optional[torch.Generator]) -> float:
    """λ ~ Beta(α, α), reproducible from ``gen`` (torch.distributions cannot take a generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device if gen is not None else None))
    return float(np.random.default_rng(seed).beta(alpha, alpha))
