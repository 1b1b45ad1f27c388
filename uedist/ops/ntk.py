"""Closed-form infinite-width kernels (NNGP and NTK) in torch, differentiable: a fully connected network and the
convolutional network NTGA's reference attacks with.

For a layer z = W φ(h) + b with weights N(0, σ_w²/fan_in) and biases N(0, σ_b²), as the width → ∞ (Lee et al.
2018; Jacot et al. 2018; Arora et al. 2019; Novak et al. 2019):

    Σˡ(x, x') = σ_w² E[φ(u) φ(v)] + σ_b²,     Σ̇ˡ(x, x') = σ_w² E[φ'(u) φ'(v)],    (u, v) ~ N(0, Σˡ⁻¹ on {x, x'})
    Θˡ = Σˡ + Θˡ⁻¹ · Σ̇ˡ                        (Θ¹ = Σ¹: the input carries no tangent)

with closed forms for ReLU (the arc-cosine kernel, Cho & Saul 2009) and erf (Williams 1997). ``kernel(a, b)``
returns the (n_a, n_b) NNGP or NTK matrix of the readout; the diagonals are computed alongside so that only the
cross matrix is materialized.

:class:`CNNKernel` is the reference's ``cnn`` surrogate (github.com/lionelmessi6410/ntga, generate_attack.py, and
APBench's ntga_poisons.py): two blocks of a 5×5 convolution (stride 2, SAME padding) + ReLU, Flatten, then Dense
384, Dense 192 and the readout, with no nonlinearity between the dense layers (as the reference writes it). A
network that ends in Flatten (no pooling) depends only on the per-position covariances of each layer — the
covariance of the same pixel position in two images (Novak et al. 2019, §3: the CNN-GP without pooling equals
the locally connected one; neural-tangents computes it with ``diagonal_spatial``): a convolution's output at q
sums over the window of q in both images, so Σˡ⁺¹[q] = σ_w² · mean_window(E[φφ])[q] + σ_b², with the window's
zero padding counted in the mean (fan_in = C·k²). tests/test_attacks.py checks the NTK against J·Jᵀ of wide
finite CNNs and the NNGP against Monte Carlo over random ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Activation = Literal["relu", "erf"]


def expect(
    kab: torch.Tensor, kaa: torch.Tensor, kbb: torch.Tensor, act: Activation
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E[φ(u)φ(v)], E[φ'(u)φ'(v)]) for (u, v) with cross covariance ``kab`` and variances ``kaa``, ``kbb``
    (broadcastable to ``kab``)."""
    if act == "relu":
        norm = torch.sqrt(kaa * kbb)
        cos = (kab / norm).clamp(-1 + 1e-7, 1 - 1e-7)
        ang = torch.arccos(cos)
        return norm * (torch.sin(ang) + (math.pi - ang) * cos) / (2 * math.pi), (math.pi - ang) / (2 * math.pi)
    pa, pb = 1 + 2 * kaa, 1 + 2 * kbb
    e = (2 / math.pi) * torch.arcsin((2 * kab / torch.sqrt(pa * pb)).clamp(-1 + 1e-7, 1 - 1e-7))
    return e, (4 / math.pi) / torch.sqrt((pa * pb - 4 * kab**2).clamp_min(1e-12))


def expect_diag(k: torch.Tensor, act: Activation) -> torch.Tensor:
    """E[φ(u)²] for u ~ N(0, k)."""
    if act == "relu":
        return k / 2
    return (2 / math.pi) * torch.arcsin(2 * k / (1 + 2 * k))


@dataclass(frozen=True)
class FCKernel:
    depth: int = 3  # hidden layers
    w_std2: float = 1.76  # σ_w² (NTGA's setting)
    b_std2: float = 0.18  # σ_b²
    activation: Activation = "relu"
    kind: Literal["ntk", "nngp"] = "ntk"

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(n_a, n_b) kernel between a (n_a, ...) and b (n_b, ...), flattened to vectors."""
        a, b = a.flatten(1), b.flatten(1)
        w, c = self.w_std2, self.b_std2
        d = a.shape[1]
        kab = w * (a @ b.T) / d + c
        kaa = w * (a * a).sum(1) / d + c
        kbb = w * (b * b).sum(1) / d + c
        theta = kab
        for _ in range(self.depth):
            e, de = expect(kab, kaa[:, None], kbb[None, :], self.activation)
            kab = w * e + c
            kaa, kbb = w * expect_diag(kaa, self.activation) + c, w * expect_diag(kbb, self.activation) + c
            theta = kab + theta * w * de
        return theta if self.kind == "ntk" else kab


def same_padding(size: int, k: int, s: int) -> Tuple[int, int, int]:
    """(output size, pad before, pad after) of a SAME convolution as JAX / TensorFlow pad it."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2, total - total // 2


def window_mean_matrix(h: int, w: int, k: int, s: int, *, dtype, device) -> Tuple[torch.Tensor, int, int]:
    """(L_out, L_in) matrix P with (P v)[q] = mean over the k×k SAME window of q of v (zeros outside): the
    per-position covariance map of a convolution's kernel. Also returns the output grid (h', w')."""
    ho, ph, _ = same_padding(h, k, s)
    wo, pw, _ = same_padding(w, k, s)
    rows, cols = [], []
    for qi in range(ho):
        for qj in range(wo):
            for di in range(k):
                for dj in range(k):
                    i, j = qi * s - ph + di, qj * s - pw + dj
                    if 0 <= i < h and 0 <= j < w:
                        rows.append(qi * wo + qj)
                        cols.append(i * w + j)
    p = torch.zeros(ho * wo, h * w, dtype=dtype, device=device)
    p[rows, cols] = 1.0 / (k * k)
    return p, ho, wo


@dataclass(frozen=True)
class CNNKernel:
    """The NNGP / NTK of NTGA's ``cnn`` surrogate at infinite width (see the module docstring)."""

    conv_layers: int = 2  # conv + activation blocks (the reference's ConvGroup(2, ...))
    filter_size: int = 5
    stride: int = 2  # the reference: 2 for CIFAR, 3 for ImageNet
    dense_layers: int = 2  # linear dense layers after Flatten, before the readout (the reference: 384, 192)
    w_std2: float = 1.76
    b_std2: float = 0.18
    activation: Activation = "relu"
    kind: Literal["ntk", "nngp"] = "ntk"
    block_entries: int = 1 << 22  # positions × pairs per block (memory), each block checkpointed under autograd

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(n_a, n_b) kernel between images a (n_a, C, H, W) and b (n_b, C, H, W)."""
        if a.dim() != 4 or b.dim() != 4 or a.shape[1:] != b.shape[1:]:
            raise ValueError(
                f"CNNKernel needs two image batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        pa, pb, maps = self._patches(a), self._patches(b), self._maps(a)
        positions = pa.shape[0]
        rows = max(1, min(a.shape[0], int(math.sqrt(self.block_entries / positions))))
        cols = max(1, min(b.shape[0], self.block_entries // (rows * positions)))
        grad = torch.is_grad_enabled() and (pa.requires_grad or pb.requires_grad)
        out = []
        for i in range(0, a.shape[0], rows):
            row = []
            for j in range(0, b.shape[0], cols):
                args = (pa[:, i : i + rows], pb[:, j : j + cols], *maps)
                row.append(checkpoint(self._block, *args, use_reentrant=False) if grad else self._block(*args))
            out.append(torch.cat(row, 1))
        return torch.cat(out, 0)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(L, N, C·k²) first-layer SAME patches per output position."""
        k, s = self.filter_size, self.stride
        _, ph0, ph1 = same_padding(x.shape[2], k, s)
        _, pw0, pw1 = same_padding(x.shape[3], k, s)
        cols = F.unfold(F.pad(x, (pw0, pw1, ph0, ph1)), k, stride=s)  # (N, C·k², L)
        return cols.permute(2, 0, 1)

    def _maps(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The window-mean matrices of conv layers 2…n."""
        h, w = (
            same_padding(x.shape[2], self.filter_size, self.stride)[0],
            same_padding(x.shape[3], self.filter_size, self.stride)[0],
        )
        maps = []
        for _ in range(self.conv_layers - 1):
            p, h, w = window_mean_matrix(h, w, self.filter_size, self.stride, dtype=x.dtype, device=x.device)
            maps.append(p)
        return tuple(maps)

    def _block(self, pa: torch.Tensor, pb: torch.Tensor, *maps: torch.Tensor) -> torch.Tensor:
        w, c, act = self.w_std2, self.b_std2, self.activation
        d = pa.shape[2]
        kab = w * torch.bmm(pa, pb.transpose(1, 2)) / d + c  # (L, na, nb)
        kaa = w * (pa * pa).sum(2) / d + c  # (L, na)
        kbb = w * (pb * pb).sum(2) / d + c
        theta = kab

        def pooled(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return (p @ v.reshape(v.shape[0], -1)).reshape(p.shape[0], *v.shape[1:])

        for p in maps:
            e, de = expect(kab, kaa[:, :, None], kbb[:, None, :], act)
            post = theta * (w * de)
            kab = w * pooled(p, e) + c
            theta = kab + pooled(p, post)
            kaa, kbb = w * (p @ expect_diag(kaa, act)) + c, w * (p @ expect_diag(kbb, act)) + c
        e, de = expect(kab, kaa[:, :, None], kbb[:, None, :], act)
        kab = w * e.mean(0) + c  # Flatten (mean over positions), then the first dense layer
        theta = kab + (theta * (w * de)).mean(0)
        for _ in range(self.dense_layers):  # the linear dense layers, then the readout
            kab = w * kab + c
            theta = kab + w * theta
        return theta if self.kind == "ntk" else kab


Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gd_mse_predict(
    k_train: torch.Tensor, k_test_train: torch.Tensor, y_train: torch.Tensor, *, t: float, diag_reg: float
) -> torch.Tensor:
    """Test outputs of the infinite-width network after gradient flow on the MSE for time ``t`` from f₀ = 0:

        f(X*) = K*ₓ K⁻¹ (I − exp(−t K / (n·k))) Y,    K regularized by diag_reg · tr(K)/n

    for n training points and k outputs: neural-tangents' ``predict.gradient_descent_mse`` (learning rate 1, the
    loss averaged over all n·k outputs: its ``normalization = y_train.size``; ``diag_reg`` relative to the mean
    trace), which the NTGA reference calls. t = ∞ gives kernel regression. Differentiable in the kernels."""
    n = k_train.shape[0]
    eye = torch.eye(n, dtype=k_train.dtype, device=k_train.device)
    k = k_train + diag_reg * torch.trace(k_train) / n * eye
    decay = eye - torch.linalg.matrix_exp(-t * k / y_train.numel()) if math.isfinite(t) else eye
    return k_test_train @ torch.linalg.solve(k, decay @ y_train)
