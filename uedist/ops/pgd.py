"""Projected gradient descent on the input (Madry et al. 2018), L∞ and L2, ascending or descending the loss.

The model's parameters get no gradient here (``torch.autograd.grad`` w.r.t. the input only), so a PGD step costs
one forward and one input-backward and leaves ``.grad`` of the parameters untouched — and, run on the
unwrapped module, triggers no DDP gradient sync. Images are in [0, 1]; radii and steps in that unit
(divide /255 settings by 255 first).

The default loss is the per-image cross-entropy *summed* over the batch: a signed (L∞) or per-image normalized
(L2) step does not depend on the loss's scale, and a summed loss gives every image the same gradient whatever
shares its forward (to the kernels' rounding), so ``chunk`` (images per forward, ``uedist.ops.batching``) leaves
an L∞ δ bit-identical and an L2 δ equal to float rounding. The random start is drawn for the whole batch first,
on the generator's device.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

from uedist.ops.batching import normal, spans, uniform

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


def draw_start(x: torch.Tensor, eps: float, norm: Norm, gen: Optional[torch.Generator]) -> torch.Tensor:
    """PGD's random start for x: uniform in the L∞ ball, or a uniform direction at a uniform radius (L2)."""
    if norm == "linf":
        return (uniform(x.shape, gen, x) * 2 - 1) * eps
    d = normal(x.shape, gen, x)
    r = uniform((x.shape[0],), gen, x).view(-1, *([1] * (x.dim() - 1)))
    return _l2_normalize(d) * eps * r


def signed_step(
    v: torch.Tensor,
    grad: torch.Tensor,
    *,
    alpha: float,
    eps: float,
    minimize: bool = False,
    x: Optional[torch.Tensor] = None,
    space: Literal["delta", "image", "offset"] = "delta",
) -> torch.Tensor:
    """One signed (L∞) gradient step of size ``alpha`` along ``grad``: v ± α·sign(g), + ascending the loss
    (adversarial), − descending it (``minimize``: error-minimizing noise, targeted attacks); then projected:

    - ``space="delta"``: v is a perturbation δ; δ ← clip_ε(δ ± α·sign(g)), then, given the clean images ``x``,
      δ ← clip(x + δ, 0, 1) − x (x + δ kept in [0, 1]).
    - ``space="image"``: v is an image z near the clean images ``x``; z ← clip(min(max(z ± α·sign(g), x − ε),
      x + ε), 0, 1) (SEP's reference: the box around x, then the image range).
    - ``space="offset"``: v is an image z; returns η = clip_ε(z ± α·sign(g) − x), not re-clipped to the image
      range (EM's reference ``eta``)."""
    step = alpha * grad.sign()
    v = v - step if minimize else v + step
    if space == "image":
        return torch.min(torch.max(v, x - eps), x + eps).clamp(0, 1)
    if space == "offset":
        return (v - x).clamp(-eps, eps)
    v = v.clamp(-eps, eps)
    return v if x is None else (x + v).clamp(0, 1) - x


def _sum_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


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
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    gen: Optional[torch.Generator] = None,
    start: Optional[torch.Tensor] = None,
    chunk: int = 0,
) -> torch.Tensor:
    """Return δ (same shape as x), ‖δ‖ ≤ eps, x + δ in [0, 1], after ``steps`` signed (L∞) or normalized (L2)
    gradient steps of size ``alpha`` that ascend (``minimize=False``: adversarial) or descend the loss.

    ``forward`` maps images in [0, 1] to logits (normalization included). ``start``: a given random start (else
    drawn from ``gen`` when ``random_start``). ``loss_fn`` (default: summed cross-entropy) must be a per-image sum
    for ``chunk`` > 0 to leave δ unchanged."""
    if steps <= 0 or eps <= 0:
        return torch.zeros_like(x)
    if start is None and random_start:
        start = draw_start(x, eps, norm, gen)
    delta = torch.zeros_like(x) if start is None else (x + start).clamp(0, 1) - x
    loss_fn = loss_fn or _sum_ce
    out = []
    for s in spans(x.shape[0], chunk):
        xs, ys, d = x[s], y[s], delta[s]
        for _ in range(steps):
            d.requires_grad_(True)
            loss = loss_fn(forward(xs + d), ys)
            (g,) = torch.autograd.grad(loss, d)
            with torch.no_grad():
                if norm == "linf":
                    d = signed_step(d, g, alpha=alpha, eps=eps, minimize=minimize, x=xs)
                else:
                    d = project(d + (-alpha if minimize else alpha) * _l2_normalize(g), eps, norm)
                    d = (xs + d).clamp(0, 1) - xs
        out.append(d.detach())
    return out[0] if len(out) == 1 else torch.cat(out)
