"""Issue 20's speed knobs change no result: δ does not depend on the inner-loop chunk, the draws stay on the
generator's device (the same numbers as before on a CPU), the batched RRC rule makes valid boxes, and the
precision / chunk defaults follow their stated rules."""

import math

import pytest
import torch

import uedist.models  # noqa: F401  (registers the models)
from uedist.config import load_config
from uedist.engine.attacks.sem_rem import SEMConfig
from uedist.ops import augment, batching
from uedist.ops.noise import min_min_noise
from uedist.ops.pgd import pgd
from uedist.precision import bf16_native, use_bf16, use_channels_last
from uedist.registry import MODELS


def _net(cl=False):
    torch.manual_seed(0)
    net = MODELS.build("resnet18", num_classes=10, stem="cifar", width=0.125).eval()
    net.requires_grad_(False)
    return net.to(memory_format=torch.channels_last) if cl else net


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("inner", ["uniform", "pgd", "none"])
def test_delta_does_not_depend_on_the_chunk(inner, bf16):
    """SEM / REM / EM δ of a real ResNet (oneDNN kernels) computed all at once and in chunks of 2, 3, 5 and 7
    images: the same bits (the draws are made before chunking, the loss is a per-image sum)."""
    net = _net(cl=bf16)
    x = torch.rand(6, 3, 32, 32)
    x = x.contiguous(memory_format=torch.channels_last) if bf16 else x
    y = torch.randint(0, 10, (6,))

    def fwd(z):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(z).float()

    outs = []
    for chunk in (0, 2, 5) if inner == "pgd" else (0, 2, 3, 5, 7):
        g = torch.Generator().manual_seed(3)
        outs.append(
            min_min_noise(
                fwd, x, y, eps=8 / 255, alpha=1.6 / 255, steps=3,
                eot=lambda z, g=g: augment.random_crop_flip(z, pad=4, gen=g), samples=3, inner=inner,
                inner_eps=4 / 255, inner_steps=2, inner_alpha=0.8 / 255, gen=g, chunk=chunk,
            )
        )  # fmt: skip
    assert outs[0].abs().max() > 0
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_does_not_depend_on_the_chunk(norm):
    """Signed (L∞) steps: the same bits; L2 steps use the gradient's values, which a convolution kernel may round
    differently at another batch size: equal to float rounding (measured max 6e-8)."""
    net = _net()
    x, y = torch.rand(5, 3, 32, 32), torch.randint(0, 10, (5,))
    eps = 8 / 255 if norm == "linf" else 0.5
    ds = [
        pgd(net, x, y, eps=eps, alpha=eps / 4, steps=3, norm=norm, gen=torch.Generator().manual_seed(1), chunk=c)
        for c in (0, 2, 4)
    ]
    assert ds[0].abs().max() > 0
    for d in ds[1:]:
        if norm == "l2":
            assert torch.allclose(d, ds[0], rtol=0, atol=1e-6)
        else:  # same bits on the AMX Xeon; on an AVX2 EPYC, a sign of a near-zero gradient may flip in a few pixels
            assert (d != ds[0]).float().mean() < 1e-3 and (d - ds[0]).abs().max() <= 2 * eps + 1e-6


def test_draws_on_a_cpu_generator_are_the_old_stream():
    """``uniform`` / PGD's start on a CPU generator: exactly ``torch.rand(shape, generator=gen)`` as before."""
    like = torch.zeros(3, 4)
    a = batching.uniform((3, 4), torch.Generator().manual_seed(7), like)
    assert torch.equal(a, torch.rand(3, 4, generator=torch.Generator().manual_seed(7)))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(augment.random_crop_flip(torch.rand(4, 3, 8, 8, generator=g1), gen=g1),
                       augment.random_crop_flip(torch.rand(4, 3, 8, 8, generator=g2), gen=g2))  # fmt: skip


def test_batched_rrc_boxes_follow_the_rule():
    """The device-side RandomResizedCrop rule (all 10 tries drawn at once): boxes inside the image, areas in the
    scale range, aspect ratios in range up to rounding, and the same area distribution as the per-image loop."""
    b, h, w = 4000, 64, 48
    kw = dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    bb = augment._rrc_boxes_batched(b, h, w, gen=torch.Generator().manual_seed(0), **kw)
    cy, cx, hh, hw = bb.unbind(1)
    assert bool(
        ((cy - hh).ge(-1 - 1e-6) & (cy + hh).le(1 + 1e-6) & (cx - hw).ge(-1 - 1e-6) & (cx + hw).le(1 + 1e-6)).all()
    )
    area = hh * hw  # fraction of the image
    assert float(area.min()) >= 0.08 - 0.02 and float(area.max()) <= 1.0 + 1e-6
    ar = (hw * w) / (hh * h)
    assert float(ar.min()) > 0.7 and float(ar.max()) < 1.45
    loop = augment._rrc_boxes(1000, h, w, gen=torch.Generator().manual_seed(0), **kw)
    assert math.isclose(float(area.mean()), float((loop[:, 2] * loop[:, 3]).mean()), abs_tol=0.03)


def test_precision_auto_follows_the_device():
    cpu = torch.device("cpu")
    assert use_bf16(None, cpu) == bf16_native(cpu) == use_channels_last(None, cpu)
    assert use_bf16(False, cpu) is False and use_bf16(True, cpu) is True and use_channels_last(False, cpu) is False
    cfg = load_config(SEMConfig, None, [])
    assert cfg.bf16 is None and cfg.channels_last is None and cfg.inner_batch == 0 and cfg.compile is False
    assert load_config(SEMConfig, None, ["bf16=false"]).bf16 is False


def test_default_chunk_rule():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert batching.default_chunk(640, device=gpu, image_hw=(32, 32), bf16=True) == 0  # a GPU: all at once
    assert batching.default_chunk(640, device=cpu, image_hw=(32, 32), bf16=False) == 32
    assert batching.default_chunk(640, device=cpu, image_hw=(32, 32), bf16=True) == 128
    assert batching.default_chunk(100, device=cpu, image_hw=(32, 32), bf16=True) == 0  # fits in one forward
    assert batching.default_chunk(512, device=cpu, image_hw=(224, 224), bf16=True) == batching.CPU_MIN_IMAGES
    spans = list(batching.spans(10, 4))
    assert [(s.start, s.stop) for s in spans] == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.slow
def test_compiled_forward_matches_eager():
    """``compile=true``: the same logits (to float rounding) and the same δ signs almost everywhere."""
    from uedist.engine.inner import forward_fn

    net = _net()
    x = torch.rand(4, 3, 32, 32)
    amp = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": False}
    eager = forward_fn(load_config(SEMConfig, None, []), net, amp)(x)
    comp = forward_fn(load_config(SEMConfig, None, ["compile=true"]), net, amp)(x)
    assert torch.allclose(eager, comp, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "wrn34_10_post", "vgg16_mlp"])
def test_folded_batchnorm_is_the_same_function(name):
    """Eval-mode BN folded into the convolutions: the same logits to float rounding, fewer BatchNorm calls, the
    original model untouched; a model in train mode is refused."""
    from uedist.models.fold import fold_batchnorm

    torch.manual_seed(0)
    net = MODELS.build(name, num_classes=10, stem="cifar", width=0.125)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(net)
    net.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(folded(x), net(x), atol=1e-4, rtol=1e-4)
    count = lambda m: sum(isinstance(s, torch.nn.BatchNorm2d) for s in m.modules())  # noqa: E731
    assert count(folded) < count(net)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_folded_noise_matches_unfolded():
    """SEM δ with ``fold_bn`` on and off, same draws: equal but for the few entries whose gradient is near zero
    (a rounding flips their sign)."""
    from uedist.engine.attacks.sem_rem import noise_for_batch

    net = _net()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    amp = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": False}
    out = []
    for fold in (True, False):
        cfg = load_config(SEMConfig, None, ["noise_steps=4", "eot_samples=2", f"fold_bn={str(fold).lower()}"])
        g = torch.Generator().manual_seed(0)
        eot = lambda z, g=g: augment.random_crop_flip(z, pad=4, gen=g)  # noqa: E731
        out.append(noise_for_batch(cfg, net, x, y=y, eot=eot, gen=g, amp=amp))
    assert (out[0] != out[1]).float().mean() < 0.03  # measured 1.1 % on this untrained net


def test_fold_is_reused_until_the_weights_change():
    """One fold per set of weights: the same folded module while nothing changes; a new one after an in-place
    update (as an optimizer step makes), computing the updated function."""
    from uedist.engine.inner import forward_fn

    net = _net()
    cfg = load_config(SEMConfig, None, [])
    amp = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": False}
    forward_fn(cfg, net, amp, fold=True)
    first = net.__dict__["_uedist_folded"][1]
    forward_fn(cfg, net, amp, fold=True)
    assert net.__dict__["_uedist_folded"][1] is first
    with torch.no_grad():
        next(net.parameters()).mul_(1.5)
    x = torch.rand(2, 3, 32, 32)
    out = forward_fn(cfg, net, amp, fold=True)(x)
    assert net.__dict__["_uedist_folded"][1] is not first
    assert torch.allclose(out, net(x), atol=1e-4, rtol=1e-4)
    assert load_config(SEMConfig, None, ["inner_batch=0"]).inner_batch == 0
    with pytest.raises(Exception, match="inner_batch"):
        load_config(SEMConfig, None, ["inner_batch=-1"])
