"""Diffusion units: the DDPM schedule (equations), the UNet (reference sizes, shapes, gradients), EMA, and the
purification chains (determinism, guidance schedule by step, guidance pulling toward the unlearnable image)."""

import math

import pytest
import torch

from uedist.diffusion.ema import EMA
from uedist.diffusion.purify import jcdp_guidance, purify, reverse_chain, sample, start_index
from uedist.diffusion.schedule import Schedule, linear_betas
from uedist.models.unet import UNETS


def test_linear_schedule_reference_values():
    b = linear_betas(1000)
    assert b.dtype == torch.float64 and len(b) == 1000
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    s = Schedule.linear(1000)
    assert s.ac[0].item() == pytest.approx(1 - 1e-4)
    assert s.ac[-1].item() == pytest.approx(math.prod(1 - v for v in b.tolist()), rel=1e-9)
    assert s.ac[-1].item() < 1e-4  # x_T is almost pure noise
    assert s.var[0].item() == 0.0  # β̃_1 = 0: the last reverse step is deterministic


def test_posterior_mean_with_true_noise_is_q_posterior():
    """With ε̂ = the true ε, μ_θ equals the mean of q(x_{t-1} | x_t, x_0) (DDPM Eq. 7)."""
    s = Schedule.linear(1000)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    eps = torch.randn_like(x0)
    i = torch.tensor([1, 10, 100, 999])
    xt = s.q_sample(x0, i, eps)
    mean, var, x0_hat = s.p_mean_var(eps, xt, i, clip=False)
    ac, acp, b = s.ac[i], s.ac[i - 1], s.betas[i]
    view = lambda v: v.float().view(-1, 1, 1, 1)  # noqa: E731
    expected = view(acp.sqrt() * b / (1 - ac)) * x0 + view((1 - b).sqrt() * (1 - acp) / (1 - ac)) * xt
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.flatten(), (b * (1 - acp) / (1 - ac)).float())


def test_respaced_keeps_alpha_bar_and_timesteps():
    s = Schedule.linear(1000)
    r = s.respaced(range(9, 1000, 10))
    assert len(r.steps) == 100 and r.steps[0] == 9 and r.steps[-1] == 999
    torch.testing.assert_close(r.ac, s.ac[9::10])
    assert start_index(r, 20) == 1
    with pytest.raises(ValueError, match="stride grid"):
        start_index(r, 25)


def test_unet_reference_parameter_counts():
    assert sum(p.numel() for p in UNETS.build("ddpm_cifar10").parameters()) == 35_746_307  # DDPM CIFAR-10: 35.7 M
    assert sum(p.numel() for p in UNETS.build("ddpm_256").parameters()) == 113_673_219  # DDPM LSUN / CelebA-HQ: 113.7 M


def tiny_unet(**kw):
    return UNETS.build(
        "unet",
        **{
            "ch": 16,
            "ch_mult": (1, 2),
            "num_res_blocks": 1,
            "attn_resolutions": (8,),
            "dropout": 0.0,
            "image_size": 16,
            **kw,
        },
    )


def test_unet_shapes_and_gradients():
    torch.manual_seed(0)
    net = tiny_unet()
    x = torch.randn(3, 3, 16, 16)
    out = net(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with pytest.raises(ValueError, match="divisible"):
        UNETS.build("unet", ch=16, ch_mult=(1, 2, 2), image_size=18)
    with pytest.raises(KeyError, match="known"):
        UNETS.build("ddpm_cifar100")


def test_ema_update_and_warmup():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = EMA(lin, decay=0.9)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema.update(lin)
    assert ema.shadow["weight"].eq(0.9).all()
    warm = EMA(lin, decay=0.9999, warmup=True)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    warm.update(lin)  # decay min(0.9999, 2/11)
    assert warm.shadow["weight"][0, 0].item() == pytest.approx(1 - 2 / 11)
    other = torch.nn.Linear(2, 1, bias=False)
    ema.copy_to(other)
    assert other.weight.eq(0.9).all()
    restored = EMA(other)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and restored.shadow["weight"].eq(0.9).all()


def _eps_fn(net):
    def fn(x, t):
        with torch.no_grad():
            return net(x, t)

    return fn


def test_purify_is_deterministic_per_generator_and_in_range():
    torch.manual_seed(0)
    net, s = tiny_unet().eval(), Schedule.linear(1000)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a = purify(_eps_fn(net), s, x, t_p=6, rounds=2, gen=torch.Generator().manual_seed(3))
    b = purify(_eps_fn(net), s, x, t_p=6, rounds=2, gen=torch.Generator().manual_seed(3))
    c = purify(_eps_fn(net), s, x, t_p=6, rounds=2, gen=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    g = sample(
        _eps_fn(net),
        s.respaced(range(99, 1000, 100)),
        (2, 3, 16, 16),
        gen=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )
    assert g.shape == (2, 3, 16, 16) and torch.isfinite(g).all()


def test_guidance_applies_by_step():
    calls = []

    def fake_lpips(a, b):
        calls.append(1)
        return (a - b).pow(2).flatten(1).sum(1)

    guide = jcdp_guidance(fake_lpips, lam_mse=2.0, lam_lpips=3.0, mse_t=(11, 1000), lpips_t=(1, 10))
    x, ref = torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    with torch.enable_grad():
        d_mse, d_lp = guide(x, ref, 11), guide(x, ref, 10)
    torch.testing.assert_close(d_mse, -2.0 * 2 * (x - ref))  # −λ₁ ∇‖x − x̃‖²
    torch.testing.assert_close(d_lp, -3.0 * 2 * (x - ref))  # −λ₂ ∇ LPIPS (here a stand-in)
    assert len(calls) == 1  # LPIPS only on t ≤ 10
    seen = []
    rec = lambda x, ref, t: seen.append(t) or torch.zeros_like(x)  # noqa: E731
    net, s = tiny_unet().eval(), Schedule.linear(1000).respaced(range(3, 1000, 4))
    reverse_chain(
        _eps_fn(net),
        s,
        torch.zeros(1, 3, 16, 16),
        k0=start_index(s, 20),
        gen=torch.Generator().manual_seed(0),
        ref=torch.zeros(1, 3, 16, 16),
        guide=rec,
    )
    assert seen == [20, 16, 12, 8, 4]  # paper steps of the strided chain, T_p first


def test_mse_guidance_pulls_toward_the_unlearnable_image():
    torch.manual_seed(0)
    net, s = tiny_unet().eval(), Schedule.linear(1000)
    x_u = torch.rand(4, 3, 16, 16) * 2 - 1
    plain = purify(_eps_fn(net), s, x_u, t_p=20, rounds=2, gen=torch.Generator().manual_seed(0))
    guide = jcdp_guidance(None, lam_mse=400.0, lam_lpips=0.0, mse_t=(1, 1000), lpips_t=(1, 0))
    guided = purify(_eps_fn(net), s, x_u, t_p=20, rounds=2, gen=torch.Generator().manual_seed(0), guide=guide)
    assert (guided - x_u).pow(2).mean() < 0.5 * (plain - x_u).pow(2).mean()


def test_mse_pull_grows_with_stride():
    from uedist.config import load_config
    from uedist.engine.purifiers.jcdp import JCDPConfig, chain, mse_pull

    def pull(*ov):
        cfg = load_config(JCDPConfig, None, ["ddpm=x", *ov])
        return mse_pull(cfg, chain(cfg, Schedule.linear(1000, variance=cfg.variance)))

    def const(*ov):
        return pull("guidance=constant", *ov)

    full, strided = const("lam_mse=30"), const("lam_mse=30", "stride=10")
    assert 0 < full < strided < 1
    assert const("lam_mse=30", "t_p=60", "stride=20", "mse_t=[21,1000]") > 1  # overshoots: warned at run time
    assert pull("method=diffusion") == 0.0
    assert 0 < pull() < 1e-3  # the reference schedule: 2·0.166·β_20 ≈ 1.6e-4 of the gap per step


def test_reference_guidance_schedule_equals_a_hand_computation():
    from uedist.diffusion.purify import reference_lambdas

    s = Schedule.linear(1000)
    lams = reference_lambdas(lambda t: float(s.ac[t - 1]))

    def by_hand(t):  # β_k linear 1e-4..0.02 over 1000 steps, ᾱ_t = Π(1 − β_k), s_t = √(1 − ᾱ)/(m √ᾱ)
        a = 1.0
        for k in range(1, t + 1):
            a *= 1 - (1e-4 + (k - 1) * (0.02 - 1e-4) / 999)
        st = math.sqrt(1 - a) / ((8 * 2 / 255 / 3) / 70000 * math.sqrt(a))
        return st / (500 * 3 * 32 * 32), st / 500  # batch-mean over 500 images (MSE also over their 3072 values)

    for t in (1, 11, 12, 20):
        assert lams(t, 3072) == pytest.approx(by_hand(t), rel=1e-9)
    assert lams(12, 3072)[0] == pytest.approx(0.110, abs=0.002) and lams(20, 3072)[0] == pytest.approx(0.166, abs=0.002)
    assert lams(1, 3072)[1] == pytest.approx(67, abs=1) and lams(11, 3072)[1] == pytest.approx(314, abs=2)


def test_reference_split_of_mse_and_lpips_steps():
    """The reference's 0-based i = t − 1: MSE for i > 10 (t = 12…20), LPIPS for i ≤ 10 (t = 1…11)."""
    from uedist.config import load_config
    from uedist.engine.purifiers.jcdp import JCDPConfig

    cfg = load_config(JCDPConfig, None, ["ddpm=x"])
    seen = {}

    def fake_lpips(a, b):
        seen["lpips"] = True
        return (a - b).pow(2).flatten(1).sum(1) * 0

    guide = jcdp_guidance(fake_lpips, lam_mse=1.0, lam_lpips=1.0, mse_t=tuple(cfg.mse_t), lpips_t=tuple(cfg.lpips_t))
    x, ref = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    terms = {}
    for t in range(1, 21):
        seen.clear()
        d = guide(x, ref, t)
        terms[t] = ("mse" if d.abs().sum() > 0 else "") + ("lpips" if seen else "")
    assert all(terms[t] == "lpips" for t in range(1, 12)) and all(terms[t] == "mse" for t in range(12, 21))
