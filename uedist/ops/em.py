"""EM's class-wise update rules (Huang et al., ICLR 2021), as pure tensor functions; the rounds live in
``uedist.engine.attacks.em``. Images in [0, 1]; noises, radii and steps in that unit (/255 converted by the caller).

reference (HanxunH/Unlearnable-Examples, ``universal_perturbation`` with ``min_min_attack`` at one step): per
batch, each sample takes one signed descent step from its class noise, then the class noise becomes the mean of
its samples' results, clamped to ±ε. The per-class *sums* and *counts* are returned separately so that several
ranks can all-reduce them before the mean (the global batch's mean, not a mean of rank means).

summed (uedist's earlier rule): one signed descent step of the class noises along the batch loss's gradient,
which sums each class's per-sample gradients.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from uedist.ops.pgd import signed_step

Fn = Callable[[torch.Tensor], torch.Tensor]


def classwise_reference_sums(
    forward: Fn, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, *, eps: float, alpha: float, eot: Fn
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums (K, C, H, W) and counts (K,) of the batch's one-step results, for x (B, C, H, W), labels y
    (B,) and the class noises ``noise`` (K, C, H, W). Per sample: z = clip(x + noise[y], 0, 1),
    η = clamp(z − α·sign(∇_z L(f(t(z)), y)) − x, −ε, ε); η is not re-clipped to the image range (the reference's
    ``eta`` is taken before its final clip). ``eot`` = t (identity in the reference); ``forward`` frozen."""
    z = (x + noise[y]).clamp(0, 1).detach().requires_grad_(True)
    loss = F.cross_entropy(forward(eot(z)), y)  # per-sample gradients, scaled by 1/B: the sign is the same
    (g,) = torch.autograd.grad(loss, z)
    eta = signed_step(z.detach(), g, alpha=alpha, eps=eps, minimize=True, x=x, space="offset")
    sums = torch.zeros_like(noise).index_add_(0, y, eta.to(noise.dtype))
    counts = torch.bincount(y, minlength=noise.shape[0]).to(noise.dtype)
    return sums, counts


def classwise_reference_update(
    noise: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, *, eps: float
) -> torch.Tensor:
    """Class noise := sums / counts for every class seen in the batch (the others keep theirs), clamped to ±ε."""
    seen = (counts > 0).view(-1, *([1] * (noise.dim() - 1)))
    mean = sums / counts.clamp(min=1).view_as(seen).to(sums.dtype)
    return torch.where(seen, mean, noise).clamp(-eps, eps)


def classwise_summed_grad(
    forward: Fn, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, *, eot: Fn
) -> torch.Tensor:
    """∇ of the batch's mean cross-entropy at t(clip(x + noise[y], 0, 1)) w.r.t. the class noises (K, C, H, W)."""
    noise = noise.detach().requires_grad_(True)
    loss = F.cross_entropy(forward(eot((x + noise[y]).clamp(0, 1))), y)
    (grad,) = torch.autograd.grad(loss, noise)
    return grad


def classwise_summed_update(noise: torch.Tensor, grad: torch.Tensor, *, eps: float, alpha: float) -> torch.Tensor:
    """One signed descent step of the class noises along ``grad`` (summed over the batch and ranks), clamped to ±ε."""
    return signed_step(noise, grad, alpha=alpha, eps=eps, minimize=True)
