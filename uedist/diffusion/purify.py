"""Diffusion purification: plain (diffuse to t*, denoise) and joint-conditional (JCDP, LE paper Algorithm 1).

Images are (B, C, H, W) in [-1, 1]; ``eps_fn(x_t, t)`` is the trained noise predictor (t: model timesteps);
``gen`` drives every random draw, so a batch purified twice with equally seeded generators gives equal results.

JCDP (Algorithm 1): for n = 1..N, diffuse the current image x to step T_p,
    x*_{T_p} = √ᾱ_{T_p} x + √(1 − ᾱ_{T_p}) ε,
then for t = T_p..1 noise the *unlearnable* image x_u equally, x̃_t = √ᾱ_t x_u + √(1 − ᾱ_t) ε', and step
    x*_{t−1} ~ N(μ_θ(x*_t, t) + σ_t² (d₁ + d₂), σ_t² I),
    d₁ = −λ₁ ∇_{x*_t} ‖x*_t − x̃_t‖²   (pixel guidance, on the steps in ``mse_t``; ‖·‖² summed per image)
    d₂ = −λ₂ ∇_{x*_t} LPIPS(x*_t, x̃_t)   (perceptual guidance, on the steps in ``lpips_t``)
(the reference's 0-based i = t − 1: MSE for i > 10, LPIPS for i ≤ 10, i.e. paper steps t ≥ 12 and t ≤ 11). The
strengths λ₁, λ₂ are the reference's schedule by default (``reference_lambdas``) or constants. Plain purification
is the same chain with N = 1 and no guidance (AVATAR, Dolatabadi et al.). A strided chain (``Schedule.respaced``)
visits fewer steps between T_p and 0.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch

from uedist.diffusion.schedule import Schedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GuideFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (x*_t, x̃_t, paper step t) -> d₁ + d₂


def randn(shape: Sequence[int], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws from ``gen`` (on its own device), moved to ``like``'s device and dtype."""
    return torch.randn(tuple(shape), generator=gen, device=gen.device).to(like)


def start_index(s: Schedule, t_p: int) -> int:
    """The chain index whose model timestep is T_p (1-based paper step), i.e. step T_p − 1 (0-based)."""
    hits = (s.steps == t_p - 1).nonzero()
    if len(hits) != 1:
        raise ValueError(
            f"T_p = {t_p} is not a step of this chain (it visits steps {(s.steps + 1).tolist()[:8]}…): "
            "choose T_p on the stride grid"
        )
    return int(hits[0])


@torch.no_grad()
def reverse_chain(
    eps_fn: EpsFn,
    s: Schedule,
    x: torch.Tensor,
    *,
    k0: int,
    gen: torch.Generator,
    ref: Optional[torch.Tensor] = None,
    guide: Optional[GuideFn] = None,
) -> torch.Tensor:
    """Run p(x_{k−1} | x_k) from chain index k0 down to 0; with ``guide``, shift each mean by σ_k²·guide(x_k,
    x̃_k, t) where x̃_k is ``ref`` noised to the same step with fresh noise. Returns x̂_0 clamped to [-1, 1]."""
    for k in range(k0, -1, -1):
        i = torch.full((x.shape[0],), k, dtype=torch.int64, device=x.device)
        mean, var, _ = s.p_mean_var(eps_fn(x, s.model_t(i)), x, i)
        if guide is not None:
            ref_t = s.q_sample(ref, i, randn(x.shape, gen, x))  # type: ignore[arg-type]
            with torch.enable_grad():
                mean = mean + var * guide(x, ref_t, int(s.steps[k]) + 1)
        x = mean + (var.sqrt() * randn(x.shape, gen, x) if k > 0 else 0)
    return x.clamp(-1, 1)


def purify(
    eps_fn: EpsFn,
    s: Schedule,
    x_u: torch.Tensor,
    *,
    t_p: int,
    rounds: int,
    gen: torch.Generator,
    guide: Optional[GuideFn] = None,
) -> torch.Tensor:
    """N = ``rounds`` rounds of diffuse-to-T_p-and-denoise, guided toward the (noised) unlearnable ``x_u``
    when ``guide`` is given (JCDP), else plain. x_u (B, C, H, W) in [-1, 1] -> purified, same shape and range."""
    k0 = start_index(s, t_p)
    x = x_u
    i0 = torch.full((x.shape[0],), k0, dtype=torch.int64, device=x.device)
    for _ in range(rounds):
        x = s.q_sample(x, i0, randn(x.shape, gen, x))
        x = reverse_chain(eps_fn, s, x, k0=k0, gen=gen, ref=x_u, guide=guide)
    return x


def sample(
    eps_fn: EpsFn, s: Schedule, shape: Sequence[int], *, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Ancestral sampling from pure noise over the whole chain -> (B, C, H, W) in [-1, 1]."""
    x = torch.randn(tuple(shape), generator=gen, device=gen.device).to(device)
    return reverse_chain(eps_fn, s, x, k0=len(s.steps) - 1, gen=gen)


def reference_strength(alpha_bar: float, *, guide_scale: float = 70000.0) -> float:
    """The LE reference's guidance scale s_t = √(1 − ᾱ_t) / (m·√ᾱ_t), m = (8·2/255/3) / guide_scale."""
    m = (8 * 2 / 255 / 3) / guide_scale
    return math.sqrt(1 - alpha_bar) / (m * math.sqrt(alpha_bar))


def reference_lambdas(
    alpha_bar: Callable[[int], float], *, guide_scale: float = 70000.0, ref_batch: int = 500
) -> Callable[[int, int], Tuple[float, float]]:
    """(paper step t, values per image D) -> (λ₁, λ₂) for uedist's per-image sums equal to the reference's pull.

    The reference multiplies by s_t the gradients of *batch-mean* losses: the MSE averaged over B·D values and
    LPIPS averaged over B images (its batch B = 500). Per image that is λ₁ = s_t / (B·D) on ‖x − x̃‖² and
    λ₂ = s_t / B on LPIPS (CIFAR-10: λ₁ ≈ 0.10–0.17 on the MSE steps, λ₂ ≈ 67–314 on the LPIPS steps)."""

    def lams(t: int, dim: int) -> Tuple[float, float]:
        st = reference_strength(alpha_bar(t), guide_scale=guide_scale)
        return st / (ref_batch * dim), st / ref_batch

    return lams


def jcdp_guidance(
    lpips_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    *,
    lam_mse: float,
    lam_lpips: float,
    mse_t: Tuple[int, int],
    lpips_t: Tuple[int, int],
    lams: Optional[Callable[[int, int], Tuple[float, float]]] = None,
) -> GuideFn:
    """d₁ + d₂ of Algorithm 1. ``lpips_fn(a, b)`` -> (B,) distances of images in [-1, 1]; ``mse_t`` / ``lpips_t``
    are inclusive ranges of paper steps t on which each term is applied. ``lams(t, D)`` -> (λ₁, λ₂) per step (the
    reference's schedule, :func:`reference_lambdas`) replaces the constants ``lam_mse`` / ``lam_lpips``."""

    def guide(x: torch.Tensor, ref: torch.Tensor, t: int) -> torch.Tensor:
        l1, l2 = lams(t, x[0].numel()) if lams is not None else (lam_mse, lam_lpips)
        d = torch.zeros_like(x)
        if l1 and mse_t[0] <= t <= mse_t[1]:
            d = d - l1 * 2 * (x - ref)  # −λ₁ ∇‖x − x̃‖²
        if l2 and lpips_t[0] <= t <= lpips_t[1]:
            if lpips_fn is None:
                raise ValueError("LPIPS guidance requested without an LPIPS network")
            xg = x.detach().float().requires_grad_(True)
            (g,) = torch.autograd.grad(lpips_fn(xg, ref.float()).sum(), xg)
            d = d - l2 * g.to(x)
        return d

    return guide
