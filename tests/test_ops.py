"""Pure tensor ops: augmentations, ISS transforms and filters, PGD (L∞ and L2)."""

import torch
import torch.nn.functional as F

from uedist.ops import augment, iss
from uedist.ops.pgd import pgd, signed_step


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_crop_flip_and_rrc_shapes_gradients_determinism():
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    y = augment.random_crop_flip(x, pad=4, gen=g())
    assert y.shape == x.shape and torch.equal(y, augment.random_crop_flip(x, pad=4, gen=g()))
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    z = augment.random_resized_crop_flip(torch.rand(3, 3, 64, 48), 24, gen=g())
    assert z.shape == (3, 3, 24, 24)
    const = torch.full((2, 3, 40, 40), 0.25)
    assert torch.allclose(augment.random_resized_crop_flip(const, 16, gen=g()), torch.full((2, 3, 16, 16), 0.25))
    assert augment.center_crop(torch.rand(1, 3, 256, 256), 224).shape == (1, 3, 224, 224)


def test_cutout_mixup_cutmix():
    ones = torch.ones(8, 3, 32, 32)
    cut = augment.cutout(ones, length=16, gen=g())
    zeroed = (cut[:, 0] == 0).flatten(1).sum(1)
    assert (zeroed <= 256).all() and (zeroed > 0).all()
    x, y = torch.rand(6, 3, 8, 8), F.one_hot(torch.arange(6) % 3, 3).float()
    for op in (augment.mixup, augment.cutmix):
        xm, ym = op(x, y, alpha=1.0, gen=g())
        assert xm.shape == x.shape and torch.allclose(ym.sum(1), torch.ones(6))


def test_iss_transforms_and_filters():
    x = torch.rand(2, 3, 16, 16)
    gray = iss.grayscale(x)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    b2 = iss.bit_depth(x, 2)
    assert set(torch.unique(torch.round(b2 * 3)).tolist()) <= {0.0, 1.0, 2.0, 3.0}
    j = iss.jpeg(x, 10)
    assert j.shape == x.shape and (j - x).abs().mean() > 0.01  # JPEG q10 really changes the image
    const = torch.full((1, 3, 9, 9), 0.4)
    for f in (iss.mean_filter, iss.median_filter, iss.gaussian_filter):
        assert torch.allclose(f(const), const, atol=1e-6)
    spike = torch.zeros(1, 1, 5, 5)
    spike[0, 0, 2, 2] = 1.0
    assert iss.median_filter(spike)[0, 0, 2, 2] == 0  # a median removes an isolated spike; a mean only spreads it
    assert abs(float(iss.mean_filter(spike)[0, 0, 2, 2]) - 1 / 9) < 1e-6


def test_pgd_linf_and_l2_ascend_within_radius():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    x, y = torch.rand(10, 3, 8, 8), torch.randint(0, 5, (10,))
    base = F.cross_entropy(m(x), y)
    d = pgd(m, x, y, eps=4 / 255, alpha=1 / 255, steps=5, gen=g())
    assert d.abs().max() <= 4 / 255 + 1e-6 and F.cross_entropy(m(x + d), y) > base
    d2 = pgd(m, x, y, eps=0.5, alpha=0.2, steps=5, norm="l2", gen=g())
    assert (d2.flatten(1).norm(dim=1) <= 0.5 + 1e-5).all() and F.cross_entropy(m(x + d2), y) > base
    assert ((x + d2) >= 0).all() and ((x + d2) <= 1).all()
    assert all(p.grad is None for p in m.parameters())


def test_signed_step_is_each_sites_former_rule_bit_for_bit():
    """The one signed L∞ step (uedist.ops.pgd.signed_step) against the expressions it replaced: PGD's
    ``project(d + sign·α·sign(g))`` then the image range, TAP/REM/EM's descending δ step, NTGA's ascending one,
    SEP's box around x then [0, 1], EM's reference offset; zero gradients and pixels at 0 and 1 included."""
    gen = g(3)
    for dtype in (torch.float32, torch.float64):
        x = torch.rand(6, 3, 8, 8, generator=gen).to(dtype)
        x[0, 0], x[1, 1] = 0.0, 1.0
        eps, alpha = 8 / 255, 2 / 255
        d = (x + (torch.rand(x.shape, generator=gen).to(dtype) * 2 - 1) * eps).clamp(0, 1) - x
        gr = torch.randn(x.shape, generator=gen).to(dtype)
        gr[2] = 0.0
        z = (x + d).clamp(0, 1)
        for minimize in (False, True):
            sign = -1.0 if minimize else 1.0
            old = (d + sign * alpha * gr.sign()).clamp(-eps, eps)
            old = (x + old).clamp(0, 1) - x
            assert torch.equal(signed_step(d, gr, alpha=alpha, eps=eps, minimize=minimize, x=x), old)
        down = (x + (d - alpha * gr.sign()).clamp(-eps, eps)).clamp(0, 1) - x
        assert torch.equal(signed_step(d, gr, alpha=alpha, eps=eps, minimize=True, x=x), down)
        up = (x + (d + alpha * gr.sign()).clamp(-eps, eps)).clamp(0, 1) - x
        assert torch.equal(signed_step(d, gr, alpha=alpha, eps=eps, x=x), up)
        assert torch.equal(
            signed_step(d, gr, alpha=alpha, eps=eps, minimize=True), (d - alpha * gr.sign()).clamp(-eps, eps)
        )
        image = torch.min(torch.max(z - alpha * gr.sign(), x - eps), x + eps).clamp(0, 1)
        assert torch.equal(signed_step(z, gr, alpha=alpha, eps=eps, minimize=True, x=x, space="image"), image)
        offset = (z - alpha * gr.sign() - x).clamp(-eps, eps)
        assert torch.equal(signed_step(z, gr, alpha=alpha, eps=eps, minimize=True, x=x, space="offset"), offset)


def test_pgd_linf_is_the_former_loop_bit_for_bit():
    """pgd's L∞ path through signed_step gives the δ of the loop it had before, ascending and descending."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    x, y = torch.rand(10, 3, 8, 8), torch.randint(0, 5, (10,))
    eps, alpha = 8 / 255, 2 / 255
    start = (torch.rand(x.shape, generator=g(1)) * 2 - 1) * eps
    for minimize in (False, True):
        d = (x + start).clamp(0, 1) - x
        for _ in range(4):
            d.requires_grad_(True)
            (gr,) = torch.autograd.grad(F.cross_entropy(m(x + d), y, reduction="sum"), d)
            with torch.no_grad():
                d = (d + (-1.0 if minimize else 1.0) * alpha * gr.sign()).clamp(-eps, eps)
                d = (x + d).clamp(0, 1) - x
        new = pgd(m, x, y, eps=eps, alpha=alpha, steps=4, minimize=minimize, start=start)
        assert torch.equal(new, d.detach())
