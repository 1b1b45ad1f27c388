"""Closed-form infinite-width kernels of a fully connected network (NNGP and NTK), in torch and differentiable.

For an L-hidden-layer network x ↦ W_{L+1} φ(W_L … φ(W_1 x + b_1) … + b_L) + b_{L+1} with weights N(0, σ_w²/fan_in)
and biases N(0, σ_b²), as the width → ∞ (Lee et al. 2018; Jacot et al. 2018; Arora et al. 2019):

    Σ⁰(x, x') = σ_w² x·x'/d + σ_b²
    Σˡ(x, x') = σ_w² E[φ(u) φ(v)] + σ_b²,     Σ̇ˡ(x, x') = σ_w² E[φ'(u) φ'(v)],    (u, v) ~ N(0, Σˡ⁻¹ on {x, x'})
    Θ⁰ = Σ⁰,    Θˡ = Σˡ + Θˡ⁻¹ · Σ̇ˡ                 (NNGP = Σᴸ⁺¹ ... read out by a last linear layer)

with closed forms for ReLU (the arc-cosine kernel, Cho & Saul 2009) and erf (Williams 1997). ``kernel(a, b)``
returns the (n_a, n_b) NNGP or NTK matrix of the readout; ``diag`` terms are computed alongside so that only
the cross matrix is materialized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Tuple

import torch


@dataclass(frozen=True)
class FCKernel:
    depth: int = 3  # hidden layers
    w_std2: float = 1.76  # σ_w² (NTGA's setting)
    b_std2: float = 0.18  # σ_b²
    activation: Literal["relu", "erf"] = "relu"
    kind: Literal["ntk", "nngp"] = "ntk"

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(n_a, n_b) kernel between the rows of a (n_a, d) and b (n_b, d)."""
        d = a.shape[1]
        kab = self.w_std2 * (a @ b.T) / d + self.b_std2
        kaa = self.w_std2 * (a * a).sum(1) / d + self.b_std2
        kbb = self.w_std2 * (b * b).sum(1) / d + self.b_std2
        theta = kab
        for _ in range(self.depth):
            kab_new, dot = self._layer(kab, kaa, kbb)
            kaa, kbb = self._diag(kaa), self._diag(kbb)
            theta = kab_new + theta * dot
            kab = kab_new
        return theta if self.kind == "ntk" else kab

    def _layer(self, kab: torch.Tensor, kaa: torch.Tensor, kbb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(Σˡ, Σ̇ˡ) cross matrices from the previous layer's cross matrix and diagonals."""
        if self.activation == "relu":
            norm = torch.sqrt(kaa[:, None] * kbb[None, :])
            cos = (kab / norm).clamp(-1 + 1e-7, 1 - 1e-7)
            ang = torch.arccos(cos)
            e = norm * (torch.sin(ang) + (math.pi - ang) * cos) / (2 * math.pi)
            de = (math.pi - ang) / (2 * math.pi)
        else:
            pa, pb = 1 + 2 * kaa[:, None], 1 + 2 * kbb[None, :]
            e = (2 / math.pi) * torch.arcsin((2 * kab / torch.sqrt(pa * pb)).clamp(-1 + 1e-7, 1 - 1e-7))
            de = (4 / math.pi) / torch.sqrt((pa * pb - 4 * kab**2).clamp_min(1e-12))
        return self.w_std2 * e + self.b_std2, self.w_std2 * de

    def _diag(self, k: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return self.w_std2 * k / 2 + self.b_std2
        return self.w_std2 * (2 / math.pi) * torch.arcsin(2 * k / (1 + 2 * k)) + self.b_std2


def gd_mse_predict(
    k_train: torch.Tensor, k_test_train: torch.Tensor, y_train: torch.Tensor, *, t: float, diag_reg: float
) -> torch.Tensor:
    """Test outputs of the infinite-width network after gradient flow on the MSE for time ``t`` from f₀ = 0:

        f(X*) = K*ₓ K⁻¹ (I − exp(−t K / n)) Y,    K regularized by diag_reg · tr(K)/n

    (neural-tangents' ``predict.gradient_descent_mse`` with learning rate 1 on the loss averaged over the n
    training points; t = ∞ gives kernel regression). Differentiable in the kernels."""
    n = k_train.shape[0]
    eye = torch.eye(n, dtype=k_train.dtype, device=k_train.device)
    k = k_train + diag_reg * torch.trace(k_train) / n * eye
    decay = eye - torch.linalg.matrix_exp(-t * k / n) if math.isfinite(t) else eye
    return k_test_train @ torch.linalg.solve(k, decay @ y_train)
