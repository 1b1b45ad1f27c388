"""D-VAE: the rate-constrained, perturbation-disentangling VAE of Yu et al. (ICML 2024; docs/purify_dvae.md).

Reference architecture (yuyi-sd/D-VAE ``ResNet18DVAE``, ``stem_end_block=7``, ``latent_dim=256``, run with
``--use_y --spatial_emb``, i.e. p̂ decoded from u_y + z): at 32 px

    encoder   3×3 conv 64 + BN + ReLU, two BasicBlocks 64 (32×32), one BasicBlock 128 stride 2   -> (B, 128, 16, 16)
    latent    1×1 convs to μ, log σ² (B, 256, 16, 16); z = μ + σ·ε; 1×1 post-conv back to 128 channels
    decoder   ConvT 4/2 128->64, ConvT 3 64->64, IN, ReLU, ConvT 3 64->32, IN, ReLU, ConvT 3 32->3, sigmoid -> x̂
    p-decoder the same layers without the sigmoid, fed u_y + z, u_y a trainable (128, 16, 16) map per class -> p̂

(The reference's unused classification head is left out.) The KL term is taken per latent *position*: summed over
the latent channels, averaged over batch and positions (``kld``), so the rate limit of Eq. 14 is a rate per
position.

**Larger images (ours; the reference is CIFAR-only).** The latent keeps the reference's spatial ratio, H/2 × W/2,
at every resolution: because the KL is per latent position, this keeps the rate *per pixel* the same as at 32 px,
so the reference's kld limits (1.0 / 3.0) keep their meaning at 112 and 256 px instead of being re-tuned. What a
larger image does need is context: ``latent_blocks`` stride-1 BasicBlocks at the latent resolution deepen the
encoder (receptive field 2·(2 per block) px wider each) without changing the latent's shape; 0 is the reference.
The spatial class embedding stays a 16×16 grid (the reference's) and is upsampled bilinearly to the latent size,
so its parameter count does not grow with H·W (a 128×128 grid for 100 classes would be 200 M parameters).

    model = DVAE(num_classes=10)                  # the reference at 32 px
    out = model(x, y)                             # x (B, 3, H, W) in [0, 1], y (B,) int64
    out.rec, out.p, out.mu, out.logvar            # x̂ in [0, 1]; p̂ unbounded; μ, log σ² (B, latent_dim, H/2, W/2)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from uedist.models.common import scaled
from uedist.models.resnet import BasicBlock


class DVAEOutput(NamedTuple):
    rec: torch.Tensor  # x̂, (B, 3, H, W) in [0, 1]
    p: torch.Tensor  # p̂, (B, 3, H, W), the perturbation estimate (unbounded)
    mu: torch.Tensor  # (B, latent_dim, H/2, W/2)
    logvar: torch.Tensor  # (B, latent_dim, H/2, W/2)


def _decoder(c: int, sigmoid: bool) -> nn.Sequential:
    """The reference's transposed-conv decoder: (B, 2c, h, w) -> (B, 3, 2h, 2w)."""
    layers = [
        nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1),
        nn.ConvTranspose2d(c, c, 3, padding=1),
        nn.InstanceNorm2d(c),
        nn.ReLU(),
        nn.ConvTranspose2d(c, c // 2, 3, padding=1),
        nn.InstanceNorm2d(c // 2),
        nn.ReLU(),
        nn.ConvTranspose2d(c // 2, 3, 3, padding=1),
    ]
    return nn.Sequential(*layers, *([nn.Sigmoid()] if sigmoid else []))


class DVAE(nn.Module):
    """See the module docstring. ``width`` scales every channel count (1.0 = the reference's 64/128)."""

    def __init__(
        self,
        num_classes: int = 10,
        *,
        latent_dim: int = 256,
        width: float = 1.0,
        stem_blocks: int = 2,
        latent_blocks: int = 0,
        emb_grid: int = 16,
    ) -> None:
        super().__init__()
        if num_classes < 1 or latent_dim < 1 or stem_blocks < 0 or latent_blocks < 0 or emb_grid < 0:
            raise ValueError("num_classes, latent_dim >= 1; stem_blocks, latent_blocks, emb_grid >= 0")
        c = max(2, scaled(64, width))
        c2 = 2 * c
        self.num_classes, self.latent_dim, self.emb_grid, self.feat = num_classes, latent_dim, emb_grid, c2
        stem = [nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        stem += [BasicBlock(c, c) for _ in range(stem_blocks)]
        stem += [BasicBlock(c, c2, stride=2)] + [BasicBlock(c2, c2) for _ in range(latent_blocks)]
        self.encoder = nn.Sequential(*stem)  # (B, 3, H, W) -> (B, 2c, H/2, W/2)
        self.fc_mu = nn.Conv2d(c2, latent_dim, 1)
        self.fc_var = nn.Conv2d(c2, latent_dim, 1)
        self.post_conv = nn.Conv2d(latent_dim, c2, 1)
        self.decoder = _decoder(c, sigmoid=True)
        self.decoder_p = _decoder(c, sigmoid=False)
        # u_y: a (2c, g, g) map per class (reference: 128×16×16), or one 2c vector per class with emb_grid=0.
        self.emb_p = nn.Embedding(num_classes, c2 * max(emb_grid, 1) ** 2)

    def embed(self, y: torch.Tensor, hw: torch.Size) -> torch.Tensor:
        """u_y as a (B, 2c, h, w) map."""
        g = max(self.emb_grid, 1)
        u = self.emb_p(y).view(-1, self.feat, g, g)
        if tuple(u.shape[-2:]) == tuple(hw):
            return u
        if g == 1:
            return u.expand(-1, -1, *hw)
        return F.interpolate(u, size=tuple(hw), mode="bilinear", align_corners=False)

    def encode(self, x: torch.Tensor):
        """x (B, 3, H, W) in [0, 1] -> μ, log σ² (B, latent_dim, H/2, W/2)."""
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"D-VAE needs even image sides, got {tuple(x.shape[-2:])}")
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_var(h)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, *, noise: Optional[torch.Tensor] = None, sample: bool = True
    ) -> DVAEOutput:
        """Encode, sample z = μ + σ·ε (ε = ``noise`` if given, else drawn; ``sample=False``: z = μ), decode x̂
        from z and p̂ from u_y + z (both after the 1×1 post-conv, as in the reference)."""
        mu, logvar = self.encode(x)
        if sample:
            eps = torch.randn_like(mu) if noise is None else noise.to(mu)
            z = mu + eps * torch.exp(0.5 * logvar)
        else:
            z = mu
        z = self.post_conv(z)
        return DVAEOutput(self.decoder(z), self.decoder_p(self.embed(y, z.shape[-2:]) + z), mu, logvar)


def kld(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) summed over latent channels, averaged over batch and latent positions (the
    reference's ``mean(-0.5·Σ_c(1 + log σ² − μ² − σ²))``); a scalar in nats per position."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()


def dvae_loss(
    out: DVAEOutput, x: torch.Tensor, *, kld_limit: float, kld_weight: float, p_floor: Optional[float] = None
):
    """Eq. 14 as in the reference code: ‖x − x̂‖² + ‖clip(x̂ + p̂) − x‖² + λ·max(KLD, kld_limit), plus
    max(‖p̂‖², p_floor) when ``p_floor`` is given (the reference adds it after epoch 10). Squared norms are
    per-pixel means. Returns (loss, dict of the detached scalar terms)."""
    loss_rec = F.mse_loss(out.rec, x)
    loss_rec_p = F.mse_loss((out.rec + out.p).clamp(0, 1), x)
    k = kld(out.mu, out.logvar)
    loss = loss_rec + loss_rec_p + kld_weight * torch.clamp(k, min=kld_limit)
    p_sq = out.p.pow(2).mean()
    if p_floor is not None:
        loss = loss + torch.clamp(p_sq, min=p_floor)
    terms = {"loss": loss, "rec": loss_rec, "rec_p": loss_rec_p, "kld": k, "p_sq": p_sq}
    return loss, {n: t.detach() for n, t in terms.items()}
