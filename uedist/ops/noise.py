"""Error-minimizing noise: the inner loop shared by EM, REM and SEM (SEM paper Algorithm 1; docs/noise.md).

``min_min_noise`` computes a perturbation δ, ‖δ‖∞ ≤ ρ_u, that *minimizes* the surrogate's loss: K_u signed
descent steps of size α_u; each step's gradient sums J draws of a random augmentation t (EOT), evaluated at

    SEM:  x' = t(x + δ) + δ_r,   δ_r ~ U(−ρ_a, ρ_a)                 (1 forward/backward per draw)
    REM:  x' = t(x + δ) + δ_a,   δ_a = PGD_ascend(t(x + δ); ρ_a, K_a, α_a)   (K_a + 1 per draw)
    EM:   x' = t(x + δ)          (no inner perturbation)

and the gradient reaches δ through t by the first-order rule: g = ∂L/∂x' is computed with x' detached, then
``(t(x + δ) · g).sum()`` is back-propagated into δ. The surrogate's parameters need no gradient here (the caller
freezes them). Images in [0, 1]; radii and steps in that unit.

All J·B augmented images, their δ_r and PGD starts are drawn at once; the forwards then run ``chunk`` images at a
time (``uedist.ops.batching``): δ does not depend on the chunking (bit-identical in tests/test_speed.py). The loss
is the per-image cross-entropy summed and divided by J·B (the mean of the reference), so no chunk-size factor
enters an image's gradient.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch

from uedist.ops.batching import input_grad, uniform
from uedist.ops.pgd import draw_start, pgd, signed_step

Inner = Literal["uniform", "pgd", "none"]


def min_min_noise(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    eot: Callable[[torch.Tensor], torch.Tensor],
    samples: int = 1,
    inner: Inner = "uniform",
    inner_eps: float = 0.0,
    inner_steps: int = 0,
    inner_alpha: float = 0.0,
    delta: Optional[torch.Tensor] = None,
    gen: Optional[torch.Generator] = None,
    chunk: int = 0,
) -> torch.Tensor:
    """δ for the batch x (B, C, H, W) with labels y; ``eot(z)`` applies one random augmentation per image of
    z (J·B, C, H, W), differentiably. ``delta`` continues from a given δ (EM); default: uniform random start.
    ``gen`` draws δ's start, δ_r and the PGD starts (on its device); ``chunk``: images per forward (0 = all)."""
    if delta is None:
        delta = (uniform(x.shape, gen, x) * 2 - 1) * eps
    delta = ((x + delta).clamp(0, 1) - x).detach()
    y_rep = y.repeat(samples)
    scale = 1.0 / (x.shape[0] * samples)
    for _ in range(steps):
        delta.requires_grad_(True)
        x_aug = eot((x + delta).repeat(samples, 1, 1, 1))  # (J·B, C, H', W'), differentiable w.r.t. δ
        x_in = x_aug.detach()
        if inner == "uniform" and inner_eps > 0:
            x_in = (x_in + (uniform(x_in.shape, gen, x_in) * 2 - 1) * inner_eps).clamp(0, 1)
        elif inner == "pgd" and inner_steps > 0:
            start = draw_start(x_in, inner_eps, "linf", gen)
            x_in = x_in + pgd(
                forward, x_in, y_rep, eps=inner_eps, alpha=inner_alpha, steps=inner_steps, start=start, chunk=chunk
            )
        g = input_grad(forward, x_in, y_rep, chunk=chunk, scale=scale)
        (grad,) = torch.autograd.grad((x_aug * g).sum(), delta)  # first-order rule through t
        with torch.no_grad():
            delta = signed_step(delta, grad, alpha=alpha, eps=eps, minimize=True, x=x)
    return delta.detach()


def quantize_noise(x_u8: torch.Tensor, delta: torch.Tensor, eps_u8: int) -> torch.Tensor:
    """Poisoned uint8 image ``clip(x + δ)`` with δ rounded to whole /255 levels and |δ| ≤ eps_u8 per pixel.

    Adds δ *then* clips the image (never clips the noise to [0, 255] first, which would drop every negative
    component — a pitfall of the reference code)."""
    d = torch.round(delta * 255.0).clamp(-eps_u8, eps_u8).to(torch.int16)
    return (x_u8.to(torch.int16) + d).clamp(0, 255).to(torch.uint8)


def forward_passes_per_image(method: str, *, steps: int, samples: int, inner_steps: int) -> int:
    """Forward/backward passes per image for one noise computation (the papers' cost: K_u·J, × (K_a + 1) for REM)."""
    per_draw = inner_steps + 1 if method == "rem" else 1
    return steps * samples * per_draw
