"""Perturbation budgets: ℓ∞, ℓ2 and ℓ0, as the seed tables state them, applied to uint8 images and checked.

    b = Budget("l2", 1.0)             # ‖δ‖₂ ≤ 1.0 per image, δ in [0, 1] units (LSP, AR)
    p = b.apply(x_u8, delta)          # the poisoned uint8 image, always within the budget
    b.measure(x_u8, p)                # per-sample size of the written δ, in the budget's unit

Units: ℓ∞ ``eps`` in /255 levels (8 = 8/255: TAP, SEP, NTGA and the EM family), ℓ2 ``eps`` in [0, 1] pixel units
over the whole image (1.0: LSP and AR; 4.0: D-VAE Table 5), ℓ0 ``eps`` in pixel positions (1: OPS; a position
counts once whatever its channels). ``apply`` adds δ, rounds to whole levels and clips the image to [0, 255]
(the noise itself is never clipped to [0, 255] first) so that what is *written* keeps the budget: ℓ∞ clamps each
level, ℓ2 shrinks δ until the rounded difference fits (rounding alone can add up to ½ level per pixel), ℓ0 keeps
the ``eps`` positions of largest change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Norm = Literal["linf", "l2", "l0"]
UNITS = {"linf": "/255", "l2": "", "l0": " px"}


@dataclass(frozen=True)
class Budget:
    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in UNITS:
            raise ValueError(f"budget norm must be one of {sorted(UNITS)}, got {self.norm!r}")
        if not self.eps > 0:
            raise ValueError(f"a {self.norm} budget must be > 0, got {self.eps}")
        if self.norm in ("linf", "l0") and self.eps != int(self.eps):
            raise ValueError(f"a {self.norm} budget is a whole number ({UNITS[self.norm].strip()}), got {self.eps}")

    def __str__(self) -> str:
        e = f"{self.eps:g}"
        return {"linf": f"ℓ∞ {e}/255", "l2": f"ℓ2 {e}", "l0": f"ℓ0 {e} px"}[self.norm]

    def apply(self, x_u8: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """uint8 ``clip(x + δ)`` (B, C, H, W) within the budget; ``delta`` in [0, 1] units, same shape."""
        if self.norm == "linf":
            d = torch.round(delta * 255.0).clamp(-self.eps, self.eps)
            return _add(x_u8, d)
        if self.norm == "l0":
            return _add(x_u8, torch.round(_keep_top_positions(delta, int(self.eps)) * 255.0))
        return _apply_l2(x_u8, delta, self.eps)

    def measure(self, x_u8: torch.Tensor, p_u8: torch.Tensor) -> torch.Tensor:
        """Per-sample size (B,) float64 of the written difference ``p − x``, in this budget's unit."""
        return measure(x_u8, p_u8, self.norm)

    def violations(self, size: torch.Tensor) -> torch.Tensor:
        """(B,) bool: samples whose measured size exceeds the budget (ℓ2 with a 1e-9 float tolerance)."""
        return size > self.eps + (1e-9 if self.norm == "l2" else 0.0)


def measure(x_u8: torch.Tensor, p_u8: torch.Tensor, norm: Norm) -> torch.Tensor:
    d = p_u8.to(torch.int16) - x_u8.to(torch.int16)
    if norm == "linf":
        return d.abs().flatten(1).amax(1).double()
    if norm == "l2":
        return d.double().flatten(1).norm(dim=1) / 255.0
    return (d != 0).any(1).flatten(1).sum(1).double()


def _add(x_u8: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return (x_u8.to(torch.int16) + d.to(torch.int16)).clamp(0, 255).to(torch.uint8)


def _keep_top_positions(delta: torch.Tensor, k: int) -> torch.Tensor:
    """δ with all but the k pixel positions of largest channel-max |δ| set to zero (per image)."""
    b, _, h, w = delta.shape
    if k >= h * w:
        return delta
    score = delta.abs().amax(1).flatten(1)  # (B, H·W)
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(1, score.topk(k, dim=1).indices, True)
    return delta * keep.view(b, 1, h, w)


def _apply_l2(x_u8: torch.Tensor, delta: torch.Tensor, eps: float, tries: int = 30) -> torch.Tensor:
    """Project δ onto the ℓ2 ball, round, and shrink the images whose *written* difference still exceeds ε
    (by the overshoot ratio, then 0.1 % more each try); a last resort rounds toward zero, which cannot grow."""
    flat = delta.flatten(1).double()
    norm = flat.norm(dim=1).clamp_min(1e-12)
    scale = torch.clamp(eps / norm, max=1.0)
    x = x_u8.to(torch.int16)
    for _ in range(tries):
        d = torch.round(delta.double() * (scale * 255.0).view(-1, 1, 1, 1))
        p = (x + d.to(torch.int16)).clamp(0, 255)
        size = (p - x).double().flatten(1).norm(dim=1) / 255.0
        over = size > eps
        if not over.any():
            return p.to(torch.uint8)
        scale = torch.where(over, scale * (eps / size) * 0.999, scale)
    d = torch.trunc(delta.double() * (scale * 255.0).view(-1, 1, 1, 1))
    return (x + d.to(torch.int16)).clamp(0, 255).to(torch.uint8)
