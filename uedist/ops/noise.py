"""Error-minimizing noise: the inner loop shared by EM, REM and SEM (REFERENCE.md; SEM paper Algorithm 1).

``min_min_noise`` computes a perturbation δ, ‖δ‖∞ ≤ ρ_u, that *minimizes* the surrogate's loss: K_u signed
descent steps of size α_u; each step's gradient averages J draws of a random augmentation t (EOT, all J draws
batched into one forward), evaluated at

    SEM:  x' = t(x + δ) + δ_r,   δ_r ~ U(−ρ_a, ρ_a)                 (1 forward/backward per draw)
    REM:  x' = t(x + δ) + δ_a,   δ_a = PGD_ascend(t(x + δ); ρ_a, K_a, α_a)   (K_a + 1 per draw)
    EM:   x' = t(x + δ)          (no inner perturbation; J = 1 and t = identity in the original)

and the gradient reaches δ through t by the first-order rule: g = ∂L/∂x' is computed with x' detached, then
``(t(x + δ) · g).sum()`` is back-propagated into δ. The surrogate's parameters need no gradient here (the caller
freezes them). Images in [0, 1]; radii and steps in that unit.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

from uedist.ops.pgd import pgd

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
) -> torch.Tensor:
    """δ for the batch x (B, C, H, W) with labels y; ``eot(z)`` applies one random augmentation per image of
    z (J·B, C, H, W), differentiably. ``delta`` continues from a given δ (EM); default: uniform random start."""
    if delta is None:
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x) * eps
    delta = ((x + delta).clamp(0, 1) - x).detach()
    y_rep = y.repeat(samples)
    for _ in range(steps):
        delta.requires_grad_(True)
        x_aug = eot((x + delta).repeat(samples, 1, 1, 1))  # (J·B, C, H', W'), differentiable w.r.t. δ
        x_in = x_aug.detach()
        if inner == "uniform" and inner_eps > 0:
            x_in = (x_in + (torch.rand(x_in.shape, generator=gen) * 2 - 1).to(x_in) * inner_eps).clamp(0, 1)
        elif inner == "pgd" and inner_steps > 0:
            x_in = x_in + pgd(forward, x_in, y_rep, eps=inner_eps, alpha=inner_alpha, steps=inner_steps, gen=gen)
        x_in.requires_grad_(True)
        loss = F.cross_entropy(forward(x_in), y_rep)
        (g,) = torch.autograd.grad(loss, x_in)
        (grad,) = torch.autograd.grad((x_aug * g).sum(), delta)  # first-order rule through t
        with torch.no_grad():
            delta = (delta - alpha * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


def quantize_noise(x_u8: torch.Tensor, delta: torch.Tensor, eps_u8: int) -> torch.Tensor:
    """Poisoned uint8 image ``clip(x + δ)`` with δ rounded to whole /255 levels and |δ| ≤ eps_u8 per pixel.

    Adds δ *then* clips the image (never clips the noise to [0, 255] first, which would drop every negative
    component — a pitfall of the reference code)."""
    d = torch.round(delta * 255.0).clamp(-eps_u8, eps_u8).to(torch.int16)
    return (x_u8.to(torch.int16) + d).clamp(0, 255).to(torch.uint8)


def forward_passes_per_image(method: str, *, steps: int, samples: int, inner_steps: int) -> int:
    """Forward/backward passes per image for one noise computation (REFERENCE.md cost formulas)."""
    per_draw = inner_steps + 1 if method == "rem" else 1
    return steps * samples * per_draw
