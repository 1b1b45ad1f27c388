"""The DDPM forward process and its reverse step (Ho et al. 2020), with constants computed in float64.

Indices are 0-based: ``i`` in [0, T) is the paper's step t = i + 1. ᾱ_i = Π_{j≤i}(1 − β_j).

    s = Schedule.linear(1000)                      # β from 1e-4 to 0.02 (the DDPM / LE reference)
    x_t = s.q_sample(x0, i, noise)                 # Eq. 4: √ᾱ_t x0 + √(1 − ᾱ_t) ε
    mean, var, x0_hat = s.p_mean_var(eps_hat, x_t, i)   # Eq. 11 with ε̂ = model(x_t, i), x̂0 clipped to [-1, 1]
    s.respaced(range(9, 1000, 10))                 # a strided chain over the kept steps (Nichol & Dhariwal 2021)
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Tuple

import torch


def linear_betas(T: int = 1000, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """DDPM's linear β schedule (§4: β_1 = 1e-4 … β_T = 0.02 for T = 1000), float64 (T,)."""
    return torch.linspace(start, end, T, dtype=torch.float64)


class Schedule:
    """β, ᾱ and the posterior q(x_{t-1} | x_t, x_0) of one chain; ``steps`` maps chain index -> model timestep."""

    def __init__(
        self,
        betas: torch.Tensor,
        *,
        steps: Optional[Sequence[int]] = None,
        variance: Literal["posterior", "beta"] = "posterior",
    ) -> None:
        b = betas.double()
        self.T = len(b)
        self.betas = b
        self.ac = torch.cumprod(1 - b, 0)  # ᾱ_i
        ac_prev = torch.cat([b.new_ones(1), self.ac[:-1]])
        self.steps = torch.as_tensor(list(steps) if steps is not None else range(self.T), dtype=torch.int64)
        post = b * (1 - ac_prev) / (1 - self.ac)  # β̃_t (Eq. 7)
        # σ_t²: the posterior variance β̃_t (DDPM "fixedsmall") or β_t ("fixedlarge", β̃_1 at the first step)
        self.var = post if variance == "posterior" else torch.cat([post[1:2], b[1:]])
        self.coef_x0 = b * ac_prev.sqrt() / (1 - self.ac)
        self.coef_xt = (1 - ac_prev) * (1 - b).sqrt() / (1 - self.ac)
        self.variance = variance

    @classmethod
    def linear(cls, T: int = 1000, start: float = 1e-4, end: float = 0.02, **kw) -> "Schedule":
        return cls(linear_betas(T, start, end), **kw)

    def respaced(self, keep: Sequence[int]) -> "Schedule":
        """The chain that visits only the kept (ascending) indices, with β'_k = 1 − ᾱ_{keep[k]} / ᾱ_{keep[k−1]}, so
        its ᾱ equal the original's at those steps; the model is still called with the original timesteps."""
        keep = sorted(int(k) for k in keep)
        ac = self.ac[keep]
        betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
        return Schedule(betas, steps=self.steps[keep].tolist(), variance=self.variance)

    def _at(self, v: torch.Tensor, i: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.to(x.device)[i].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_i = √ᾱ_i x0 + √(1 − ᾱ_i) ε; x0 (B, C, H, W) in [-1, 1], i (B,) chain indices."""
        return self._at(self.ac.sqrt(), i, x0) * x0 + self._at((1 - self.ac).sqrt(), i, x0) * noise

    def model_t(self, i: torch.Tensor) -> torch.Tensor:
        """Chain indices -> the model's timesteps (identical unless respaced)."""
        return self.steps.to(i.device)[i]

    def p_mean_var(
        self, eps: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor, *, clip: bool = True
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reverse step p(x_{i-1} | x_i) from ε̂: (mean μ_θ, variance σ_i² broadcastable, x̂0)."""
        x0 = (x_t - self._at((1 - self.ac).sqrt(), i, x_t) * eps) / self._at(self.ac.sqrt(), i, x_t)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = self._at(self.coef_x0, i, x_t) * x0 + self._at(self.coef_xt, i, x_t) * x_t
        return mean, self._at(self.var, i, x_t), x0
