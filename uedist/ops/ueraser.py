"""UEraser adversarial augmentations (Qin et al. 2023, "Learning the Unlearnable: Adversarial Augmentations Suppress
Unlearnable Example Attacks", arXiv:2303.15127), in pure torch: batched, per-image parameters, any device.

The reference (github.com/lafeat/ueraser: ``EM/QuickStart.ipynb``, the EM ``trainer.py`` of
github.com/Tianyue818/Source-of-UEraser, ``LSP/cifar_train.py``) is a kornia pipeline applied after the usual
crop(pad 4)+flip of the data loader::

    K.AugmentationSequential(
        K.RandomPlasmaBrightness(roughness=(0.3, 0.7), intensity=(0.5, 1.0), p=1.0),
        K.RandomPlasmaContrast(roughness=(0.3, 0.7), p=1.0),
        K.RandomChannelShuffle(p=0.5),
        K.auto.TrivialAugment())

(the later library file ``ueraser.py`` of lafeat/ueraser lowers both plasma probabilities to 0.5: ``plasma_p``).
UEraser-Max draws the pipeline K = 5 times per image and trains on the per-image maximum of the cross-entropy
(:func:`repeat_loss`); UEraser-Lite draws it once.

Randomness: per-image parameters come from ``gen`` (a CPU ``torch.Generator``, as in :mod:`uedist.ops.augment`, so a
run's stream is in its checkpoint); the plasma noise fields, which are large, are drawn on the images' device from a
generator seeded from ``gen`` (deterministic for a seed on a given device type; CPU and CUDA streams differ).
Images are float (B, C, H, W) in [0, 1]; every output is in [0, 1].
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

Range = Tuple[float, float]

# kornia.contrib.diamond_square: its two 3x3 kernels (filter2d, reflect border) and its border compensation
_DIAMOND = ((0.25, 0.0, 0.25), (0.0, 0.0, 0.0), (0.25, 0.0, 0.25))
_SQUARE = ((0.0, 0.25, 0.0), (0.25, 0.0, 0.25), (0.0, 0.25, 0.0))


def _uniform(gen: Optional[torch.Generator], n: int, bounds: Range) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n, generator=gen)


def _noise_gen(gen: Optional[torch.Generator], device: torch.device) -> Optional[torch.Generator]:
    """A generator on ``device`` seeded from ``gen`` (None: the global RNG), for big noise fields."""
    if gen is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return g


def _ds_seed(n: int, sh: int, sw: int, rand: Callable[..., torch.Tensor]) -> torch.Tensor:
    """(n, 1, sh, sw) seed grid, one of sh / sw being 3 and the other odd: kornia's ``_diamond_square_seed``, quirks
    kept (the final /3 also divides the corners and centres; the right edge reuses the bottom-left corner)."""
    transpose = sw == 3
    length = sh if transpose else sw
    res = rand(n, 1, 3, length)
    res[..., ::2, ::2] = rand(n, 1, 2, (length + 1) // 2)
    res[..., 1, 1::2] = (res[..., ::2, :-2:2] + res[..., ::2, 2::2]).sum(dim=2) / 4.0
    corner = res[..., 2, 0].clone()
    res[..., 1, 0] = res[..., 0, 0] + res[..., 1, 1] + corner
    res[..., 1, -1] = res[..., -1, -1] + res[..., 1, -2] + corner
    mid = res[..., 1, 1::2].clone()
    res[..., 0, 1::2] = res[..., 0, 0:-2:2] + res[..., 0, 2::2] + mid
    res[..., 2, 1::2] = res[..., 2, 0:-2:2] + res[..., 2, 2::2] + mid
    res = res / 3.0
    return res.transpose(2, 3) if transpose else res


def _filter3(x: torch.Tensor, kernel: Tuple[Tuple[float, ...], ...]) -> torch.Tensor:
    """kornia ``filter2d`` defaults: 'same' output, reflect border."""
    k = torch.tensor(kernel, device=x.device, dtype=x.dtype)[None, None]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k)


def _ds_step(img: torch.Tensor, scale: torch.Tensor, rand: Callable[..., torch.Tensor]) -> torch.Tensor:
    """One diamond + one square step: (n, 1, h, w) -> (n, 1, 2h-1, 2w-1); new points are
    (1 - s) * (mean of the neighbours) + s * U(0, 1) (kornia ``_one_diamond_one_square``)."""
    n, _, h, w = img.shape
    new = img.new_zeros(n, 1, 2 * h - 1, 2 * w - 1)
    new[..., ::2, ::2] = img
    comp = torch.ones_like(new)  # border points have 3 neighbours: x 1/0.75
    comp[..., 0, :] = 1 / 0.75
    comp[..., -1, :] = 1 / 0.75
    comp[..., :, 0] = 1 / 0.75
    comp[..., :, -1] = 1 / 0.75
    noise = rand(*new.shape) * scale
    diamond = _filter3(new, _DIAMOND)
    at = (diamond > 0).to(new.dtype)  # the (odd, odd) centres
    new = new + (1 - scale) * diamond * at + at * noise
    square = _filter3(new, _SQUARE) * comp
    at = (square > 0).to(new.dtype)  # the edge midpoints
    return new + at * noise + (1 - scale) * at * square


@torch.no_grad()
def diamond_square(
    shape: Tuple[int, int, int, int],
    roughness: torch.Tensor,
    *,
    gen: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plasma fractal noise (B, C, H, W), one independent field per image and channel, by the diamond-square
    algorithm exactly as ``kornia.contrib.diamond_square(shape, roughness)`` computes it (random_scale 1, no
    normalisation): a 3 x (2k+1) random seed grid, then ``depth`` doublings to the next 2^n + 1 size, the noise
    scale multiplied by ``roughness`` (B,) at each doubling; cropped to (H, W). Values are >= 0 and about [0, 1]
    (border points, compensated x4/3 after kornia's reflect padding, can reach ~2). H, W >= 3."""
    b, c, h, w = shape
    if min(h, w) < 3:
        raise ValueError(f"diamond_square needs H, W >= 3; got {h}x{w}")
    device = torch.device(device or "cpu")
    g = _noise_gen(gen, device)

    def rand(*size: int) -> torch.Tensor:
        return torch.rand(size, generator=g, device=device, dtype=dtype)

    ph, pw = 2 ** math.ceil(math.log2(h - 1)) + 1, 2 ** math.ceil(math.log2(w - 1)) + 1
    depth = int(min(math.log2(ph - 1), math.log2(pw - 1))) - 1
    img = _ds_seed(b * c, (ph - 1) // 2**depth + 1, (pw - 1) // 2**depth + 1, rand)
    r = roughness.to(device, dtype).repeat_interleave(c).view(-1, 1, 1, 1)  # one roughness per image
    scale = torch.ones_like(r)
    for _ in range(depth):
        scale = scale * r
        img = _ds_step(img, scale, rand)
    return img[..., :h, :w].reshape(b, c, h, w)


def _where_drawn(on: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(on.to(x.device)[:, None, None, None], out, x)


def plasma_brightness(
    x: torch.Tensor,
    *,
    roughness: Range = (0.3, 0.7),
    intensity: Range = (0.5, 1.0),
    p: float = 1.0,
    gen: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """kornia ``RandomPlasmaBrightness``: x + intensity * (2 * plasma - 1), clipped to [0, 1], with probability p
    per image; roughness and intensity uniform per image."""
    b = x.shape[0]
    r, k = _uniform(gen, b, roughness), _uniform(gen, b, intensity)
    on = torch.rand(b, generator=gen) < p
    field = diamond_square(tuple(x.shape), r, gen=gen, device=x.device, dtype=x.dtype)  # (B, C, H, W)
    out = (x + (2 * field - 1) * k.to(x)[:, None, None, None]).clamp(0, 1)
    return _where_drawn(on, out, x)


def plasma_contrast(
    x: torch.Tensor, *, roughness: Range = (0.3, 0.7), p: float = 1.0, gen: Optional[torch.Generator] = None
) -> torch.Tensor:
    """kornia ``RandomPlasmaContrast``: (x - 0.5) * 4 * plasma + 0.5, clipped to [0, 1], with probability p."""
    b = x.shape[0]
    r = _uniform(gen, b, roughness)
    on = torch.rand(b, generator=gen) < p
    field = diamond_square(tuple(x.shape), r, gen=gen, device=x.device, dtype=x.dtype)
    return _where_drawn(on, ((x - 0.5) * 4 * field + 0.5).clamp(0, 1), x)


def channel_shuffle(x: torch.Tensor, *, p: float = 0.5, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """kornia ``RandomChannelShuffle``: a uniformly random channel permutation per image, with probability p."""
    b, c = x.shape[:2]
    perm = torch.rand(b, c, generator=gen).argsort(1)
    on = torch.rand(b, generator=gen) < p
    perm = torch.where(on[:, None], perm, torch.arange(c).expand(b, c)).to(x.device)
    return x.gather(1, perm[:, :, None, None].expand_as(x))


# kornia.augmentation.auto.trivial_augment.default_policy: (op, low, high); kornia leaves identity out
TA_OPS: Tuple[Tuple[str, float, float], ...] = (
    ("auto_contrast", 0.0, 1.0),
    ("equalize", 0.0, 1.0),
    ("rotate", -30.0, 30.0),  # degrees
    ("posterize", 0.0, 4.0),  # bits kept (float, as kornia's RandomPosterize)
    ("solarize", 0.0, 1.0),  # threshold
    ("contrast", 0.1, 1.9),
    ("brightness", 0.1, 1.9),
    ("sharpness", 0.1, 1.9),
    ("shear_x", -0.3, 0.3),  # shear factor
    ("shear_y", -0.3, 0.3),
    ("translate_x", -0.5, 0.5),  # fraction of the width
    ("translate_y", -0.5, 0.5),
)
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def _affine(x: torch.Tensor, kind: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Rotate / shear / translate each image about its centre (bilinear, zero fill). ``kind`` (B,): index into
    :data:`_GEOMETRIC`; ``mag`` (B,): degrees, shear factor or fraction of the size; both on the CPU."""
    _, _, h, w = x.shape
    rot, rad = kind == 0, torch.deg2rad(mag)
    zero = torch.zeros_like(mag)
    cos, sin = torch.where(rot, rad.cos(), 1 + zero), torch.where(rot, rad.sin(), zero)
    shx, shy = torch.where(kind == 1, mag, zero), torch.where(kind == 2, mag, zero)
    # output -> input map in pixel offsets from the centre, then to [-1, 1] units:
    # diag(2/W, 2/H) @ [[cos, -sin + shx], [sin + shy, cos]] @ diag(W/2, H/2); a positive shift moves the content
    # right / down
    row0 = torch.stack([cos, (shx - sin) * h / w, torch.where(kind == 3, -2 * mag, zero)], 1)
    row1 = torch.stack([(sin + shy) * w / h, cos, torch.where(kind == 4, -2 * mag, zero)], 1)
    theta = torch.stack([row0, row1], 1).to(x.device, x.dtype)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _auto_contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    flat = hi <= lo  # a constant channel is left as it is (PIL)
    return ((x - lo.masked_fill(flat, 0)) / (hi - lo).masked_fill(flat, 1)).clamp(0, 1)


def _equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """PIL / torchvision histogram equalisation per channel on the levels floor(255 x)."""
    b, c, h, w = x.shape
    q = (x * 255).long().clamp(0, 255).view(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float32))
    last = hist.gather(1, q.amax(1, keepdim=True))  # count of the highest level present
    step = torch.div(h * w - last, 255, rounding_mode="floor")  # (BC, 1)
    lut = torch.div(
        hist.cumsum(1) + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1), rounding_mode="floor"
    )
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, q), q.float()) / 255
    return out.view(b, c, h, w).to(x.dtype)


def _posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    step = 2.0 ** (8 - m)  # keep m (float) high bits of the 8-bit levels; m -> 0 gives black
    return torch.floor(torch.floor(x * 255) / step) * step / 255


def _sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """PIL sharpness: blend with the 3x3 smoothed image (kernel [[1,1,1],[1,5,1],[1,1,1]]/13; border kept)."""
    c = x.shape[1]
    k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device, dtype=x.dtype) / 13
    smooth = F.conv2d(x, k.expand(c, 1, 3, 3), groups=c).clamp(0, 1)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return (degenerate + (x - degenerate) * m).clamp(0, 1)


_COLOR_OPS = {
    "auto_contrast": _auto_contrast,
    "equalize": _equalize,
    "posterize": _posterize,
    "solarize": lambda x, m: torch.where(x < m, x, 1 - x),
    "contrast": lambda x, m: (x * m).clamp(0, 1),  # kornia adjust_contrast (OpenCV-style: no mean)
    "brightness": lambda x, m: (x + m - 1).clamp(0, 1),  # kornia RandomBrightness: additive factor - 1
    "sharpness": _sharpness,
}


def trivial_augment_op(x: torch.Tensor, name: str, mag: torch.Tensor) -> torch.Tensor:
    """One TrivialAugment op ``name`` of :data:`TA_OPS` on every image, magnitudes ``mag`` (B,) on the CPU."""
    if name in _GEOMETRIC:
        return _affine(x, torch.full(mag.shape, _GEOMETRIC.index(name)), mag)
    return _COLOR_OPS[name](x, mag.to(x.device, x.dtype)[:, None, None, None])


def trivial_augment(x: torch.Tensor, *, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """TrivialAugment (Müller & Hutter 2021) with kornia's default policy :data:`TA_OPS`: each image gets one op
    drawn uniformly from the 12 and a magnitude uniform in the op's range.

    All 12 ops of kornia's default policy are included (identity is left out, as kornia does). Differences from
    ``kornia.augmentation.auto.TrivialAugment``: (1) kornia picks one op per call for the whole batch; here every
    image draws its own op (the TrivialAugment paper / torchvision, per-image); (2) rotate, shear and translate
    take a random sign (magnitude uniform in [-max, max]); kornia versions differ here (some sample [0, max]
    only); (3) shear is the AutoAugment shear factor (x_in = x + s·y, about the centre), where kornia's
    RandomShear reads the range as degrees (x180 in some versions); (4) equalize bins on floor(255 x) for both
    histogram and lookup (PIL), kornia bins with ``histc``; posterize floors exactly (kornia's uint8 round trip
    can land one level lower). Colour ops follow kornia: contrast = x·f, brightness = x + f - 1 (both clipped),
    solarize inverts values >= the threshold, auto-contrast stretches each channel to [0, 1].
    """
    b = x.shape[0]
    op = torch.randint(0, len(TA_OPS), (b,), generator=gen)
    u = torch.rand(b, generator=gen)
    lo, hi = torch.tensor([o[1] for o in TA_OPS]), torch.tensor([o[2] for o in TA_OPS])
    mag = lo[op] + (hi[op] - lo[op]) * u  # (B,) on the CPU
    out = x.clone()
    geo = torch.tensor([o[0] in _GEOMETRIC for o in TA_OPS])[op]
    if geo.any():
        idx = geo.nonzero().squeeze(1)
        kind = torch.tensor([_GEOMETRIC.index(o[0]) if o[0] in _GEOMETRIC else -1 for o in TA_OPS])[op[idx]]
        out[idx.to(x.device)] = _affine(x[idx.to(x.device)], kind, mag[idx])
    for j, (name, _, _) in enumerate(TA_OPS):
        idx = (op == j).nonzero().squeeze(1)
        if name in _COLOR_OPS and idx.numel():
            out[idx.to(x.device)] = trivial_augment_op(x[idx.to(x.device)], name, mag[idx])
    return out


def ueraser_augment(
    x: torch.Tensor, *, plasma_p: float = 1.0, shuffle_p: float = 0.5, gen: Optional[torch.Generator] = None
) -> torch.Tensor:
    """One UEraser draw per image: plasma brightness -> plasma contrast -> channel shuffle -> TrivialAugment.
    (B, C, H, W) in [0, 1] -> same. For UEraser-Max pass the batch tiled K times (``x.repeat(K, 1, 1, 1)``)."""
    x = plasma_brightness(x, p=plasma_p, gen=gen)
    x = plasma_contrast(x, p=plasma_p, gen=gen)
    x = channel_shuffle(x, p=shuffle_p, gen=gen)
    return trivial_augment(x, gen=gen)


def repeat_loss(logits: torch.Tensor, y: torch.Tensor, repeats: int, *, reduce: str = "max") -> torch.Tensor:
    """UEraser loss over K draws per image: ``logits`` (K·B, classes) of the draw-major tiled batch, ``y`` (B,).
    reduce="max": mean over images of the max over draws of the cross-entropy (UEraser-Max, the reference's
    ``adversarial_augmentation_loss``); "mean": the plain mean over all K·B (UEraser-Lite on K draws)."""
    per = F.cross_entropy(logits, y.repeat(repeats), reduction="none").view(repeats, -1)  # (K, B)
    if reduce == "max":
        return per.max(0).values.mean()
    if reduce == "mean":
        return per.mean()
    raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
