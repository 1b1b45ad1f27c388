"""Projected gradient descent on the input (Madry et al. 2018), L∞ and L2, ascending or descending the loss.

The model's parameters get no gradient here (``torch.autograd.grad`` w.r.t. the input only), so a PGD step costs
one forward and one input-backward and leaves ``.grad`` of the parameters untouched — and, run on the
unwrapped module, triggers no DDP gradient sync. Images are in [0, 1]; radii and steps in that unit
(divide /255 settings by 255 first).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

Norm = Literal["linf", "l2"]


def _l2_normalize(g: torch.Tensor) -> torch.Tensor:
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / n.view(-1, *([1] * (g.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """Project ``delta`` onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (eps / n).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))


def pgd(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: Norm = "linf",
    random_start: bool = True,
    minimize: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    gen: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Return δ (same shape as x), ‖δ‖ ≤ eps, x + δ in [0, 1], after ``steps`` signed (L∞) or normalized (L2)
    gradient steps of size ``alpha`` that ascend (``minimize=False``: adversarial) or descend the loss.

    ``forward`` maps images in [0, 1] to logits (normalization included)."""
    if steps <= 0 or eps <= 0:
        return torch.zeros_like(x)
    if random_start:
        if norm == "linf":
            delta = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x) * eps
        else:
            d = torch.randn(x.shape, generator=gen).to(x)
            r = torch.rand(x.shape[0], generator=gen).to(x).view(-1, *([1] * (x.dim() - 1)))
            delta = _l2_normalize(d) * eps * r
        delta = (x + delta).clamp(0, 1) - x
    else:
        delta = torch.zeros_like(x)
    sign = -1.0 if minimize else 1.0
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(forward(x + delta), y)
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            step = g.sign() if norm == "linf" else _l2_normalize(g)
            delta = project(delta + sign * alpha * step, eps, norm)
            delta = (x + delta).clamp(0, 1) - x
    return delta.detach()
