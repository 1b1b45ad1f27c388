"""Error-minimizing noise ops: radius, valid range, loss goes down, no parameter gradients, quantization."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from uedist.ops.augment import random_crop_flip
from uedist.ops.noise import forward_passes_per_image, min_min_noise, quantize_noise


def _model():
    torch.manual_seed(0)  # a model whose loss depends on the input strongly enough for 16/255 to matter
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 5, padding=2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 16 * 16, 4)
    )
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def test_min_min_lowers_loss_within_radius():
    m = _model()
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    g = torch.Generator().manual_seed(1)
    base = F.cross_entropy(m(x), y).item()
    for inner in ("uniform", "pgd", "none"):
        d = min_min_noise(
            m,
            x,
            y,
            eps=16 / 255,
            alpha=4 / 255,
            steps=15,
            eot=lambda z: random_crop_flip(z, pad=2, gen=g),
            samples=2,
            inner=inner,
            inner_eps=4 / 255,
            inner_steps=2,
            inner_alpha=2 / 255,
            gen=g,
        )
        assert d.abs().max() <= 16 / 255 + 1e-6 and (x + d).min() >= 0 and (x + d).max() <= 1
        assert F.cross_entropy(m(x + d), y).item() < base - 0.01, inner
    assert all(p.grad is None for p in m.parameters())


def test_cost_formula_matches_reference():
    assert forward_passes_per_image("rem", steps=10, samples=5, inner_steps=10) == 550  # REFERENCE.md, CIFAR
    assert forward_passes_per_image("sem", steps=10, samples=5, inner_steps=10) == 50


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.integers(0, 2**31 - 1))
def test_quantized_poison_within_eps_and_keeps_negative_noise(eps, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, 3, 5, 5), generator=g, dtype=torch.int64).to(torch.uint8)
    delta = (torch.rand(2, 3, 5, 5, generator=g) * 2 - 1) * 3 * eps / 255  # deliberately beyond eps
    p = quantize_noise(x, delta, eps)
    diff = p.int() - x.int()
    assert p.dtype == torch.uint8 and diff.abs().max() <= eps
    inside = (x.int() >= eps) & (x.int() <= 255 - eps)
    want = torch.round(delta * 255).clamp(-eps, eps).int()
    assert torch.equal(diff[inside], want[inside])  # negative components survive (no clamp of δ to [0, 255])
