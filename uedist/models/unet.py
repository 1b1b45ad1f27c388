"""The DDPM noise-prediction UNet (Ho et al. 2020, the architecture of their CIFAR-10 / LSUN / CelebA-HQ models).

Sinusoidal timestep embedding → MLP (4·ch); per resolution ``num_res_blocks`` residual blocks (GroupNorm, SiLU,
3×3 convs, timestep projection added after the first conv, dropout) with self-attention where the feature map is
in ``attn_resolutions``; strided-conv downsampling, nearest + conv upsampling, skip connections concatenated on
the way up (``num_res_blocks + 1`` blocks per level). Output: ε̂ with the input's shape.

Registered in ``UNETS`` (not the classifier zoo ``MODELS``, whose builders take ``num_classes``):

    net = UNETS.build("ddpm_cifar10")       # ch 128, mults 1-2-2-2, 2 res blocks, attention at 16: 35,746,307 params
    net = UNETS.build("ddpm_256")           # ch 128, mults 1-1-2-2-4-4, 2 res blocks, attention at 16 (LSUN/CelebA-HQ)
    net = UNETS.build("unet", ch=32, ch_mult=(1, 2, 2), image_size=32)   # small CPU model
    eps = net(x_t, t)                       # x_t (B, 3, H, W) in about [-1, 1]; t (B,) int64 in [0, T)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uedist.registry import Registry

UNETS = Registry("diffusion unet")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) steps -> (B, dim) sinusoidal embedding (the DDPM / tensor2tensor form: [sin | cos])."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)  # 32 groups at the reference widths; fewer for tiny test nets


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, *, temb: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb, cout)
        self.norm2, self.drop, self.conv2 = _norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.qkv, self.proj = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # each (B, HW, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Down(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # DDPM's asymmetric padding


class Up(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        image_size: int = 32,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(ch_mult) - 1} (ch_mult {ch_mult})")
        self.ch, self.image_size, self.in_channels = ch, image_size, in_channels
        temb = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        chans, cur, res = [ch], ch, image_size
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(self._level(cur, ch * m, temb, dropout=dropout, attn=res in attn_resolutions))
                cur = ch * m
                chans.append(cur)
            if i != len(ch_mult) - 1:
                self.down.append(Down(cur))
                chans.append(cur)
                res //= 2
        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, temb=temb, dropout=dropout),
                AttnBlock(cur),
                ResBlock(cur, cur, temb=temb, dropout=dropout),
            ]
        )
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(
                    self._level(cur + chans.pop(), ch * m, temb, dropout=dropout, attn=res in attn_resolutions)
                )
                cur = ch * m
            if i != 0:
                self.up.append(Up(cur))
                res *= 2
        self.norm_out, self.conv_out = _norm(cur), nn.Conv2d(cur, in_channels, 3, padding=1)

    @staticmethod
    def _level(cin: int, cout: int, temb: int, *, dropout: float, attn: bool) -> nn.ModuleList:
        return nn.ModuleList([ResBlock(cin, cout, temb=temb, dropout=dropout), *([AttnBlock(cout)] if attn else [])])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) integer steps in [0, T) -> ε̂ (B, C, H, W)."""
        emb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for blk in self.down:
            h = self._run(blk, h, emb)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for blk in self.up:
            h = self._run(blk, h if isinstance(blk, Up) else torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _run(blk: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(blk, (Down, Up)):
            return blk(h)
        h = blk[0](h, emb)
        return blk[1](h) if len(blk) > 1 else h


@UNETS.register("unet")
def unet(**kw) -> UNet:
    """Any configuration: ch, ch_mult, num_res_blocks, attn_resolutions, dropout, image_size, in_channels."""
    return UNet(**kw)


@UNETS.register("ddpm_cifar10")
def ddpm_cifar10(**kw) -> UNet:
    """DDPM's CIFAR-10 model (the LE paper's purifier): ch 128, 1-2-2-2, 2 res blocks, attention at 16, dropout 0.1."""
    return UNet(
        **{
            "ch": 128,
            "ch_mult": (1, 2, 2, 2),
            "num_res_blocks": 2,
            "attn_resolutions": (16,),
            "dropout": 0.1,
            "image_size": 32,
            **kw,
        }
    )


@UNETS.register("ddpm_256")
def ddpm_256(**kw) -> UNet:
    """DDPM's 256 px model (LSUN / CelebA-HQ): ch 128, 1-1-2-2-4-4, 2 res blocks, attention at 16, dropout 0."""
    return UNet(
        **{
            "ch": 128,
            "ch_mult": (1, 1, 2, 2, 4, 4),
            "num_res_blocks": 2,
            "attn_resolutions": (16,),
            "dropout": 0.0,
            "image_size": 256,
            **kw,
        }
    )
