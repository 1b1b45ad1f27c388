"""The REM / SEM reference code's δ loop, kept only for the side-by-side speed comparison of
``launch/bench/noise.py`` (``noise_steps(..., structure="reference")``): the same algorithm and pass count as
:func:`uedist.ops.noise.min_min_noise`, the reference's batching. Nothing else uses it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from uedist.ops.pgd import pgd


def reference_noise_delta(
    cfg: Any,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eot: Callable[[torch.Tensor], torch.Tensor],
    gen: torch.Generator,
    amp: dict[str, Any],
) -> torch.Tensor:
    """δ of a ``SEMConfig`` the way the REM/SEM reference code computes it (``robust_workers.py``): per δ step, J
    separate calls of B images, each ``t(x + δ)`` → inner perturbation → forward → mean cross-entropy → input
    gradient → ``(t(x+δ) · g).sum().backward()`` accumulating into δ.grad; then a signed step of
    ``noise_step_size`` and the clamp to ``budget`` (both /255)."""
    eps, alpha = cfg.budget / 255, cfg.noise_step_size / 255
    r_eps, r_alpha = cfg.adv_eps / 255, cfg.adv_step_size / 255

    def fwd(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(**amp):
            return model(z).float()

    def uniform(like: torch.Tensor) -> torch.Tensor:
        return torch.rand(like.shape, generator=gen, device=gen.device).to(like) * 2 - 1

    model.eval()
    model.requires_grad_(False)
    delta = (uniform(x) * eps).requires_grad_(True)
    for _ in range(cfg.noise_steps):
        delta.grad = None
        for _ in range(cfg.eot_samples):
            def_x = eot((x + delta).clamp(0, 1))
            adv = def_x.detach()
            if cfg.method == "sem":
                adv = (adv + uniform(adv) * r_eps).clamp(0, 1)
            elif cfg.method == "rem":
                adv = adv + pgd(fwd, adv, y, eps=r_eps, alpha=r_alpha, steps=cfg.adv_steps, gen=gen)
            adv.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(fwd(adv), y), adv)
            (def_x * g).sum().backward()
        with torch.no_grad():
            delta -= alpha * delta.grad.sign()
            delta.clamp_(-eps, eps)
    model.requires_grad_(True)
    model.train()
    return ((x + delta.detach()).clamp(0, 1) - x).detach()
