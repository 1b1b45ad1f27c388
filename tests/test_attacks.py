"""The attacks of the seed tables (TAP, SEP, NTGA, LSP, AR, OPS): budgets, partial poisoning, each attack's core
against a direct computation of its definition, a killed job resuming to identical shards. Each attack end to end
through launch/attack.py (its declared budget checked on every written sample, 2 processes writing what 1 does):
tests/test_stages_smoke.py, parametrized over the registry."""

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO
from tests.test_noise_resume import _kill_when, _shards
from uedist.app.stages import get_stage
from uedist.data.images import decode_image
from uedist.data.manifest import Manifest, ShardInfo, keys_of, load_manifest
from uedist.data.shards import iter_samples
from uedist.engine.attacks.ar import ar_coefficients, ar_process
from uedist.engine.attacks.base import poison_keys
from uedist.engine.attacks.lsp import LSPConfig, lsp_delta
from uedist.engine.attacks.ops import ops_scores, ops_search
from uedist.engine.attacks.sep import pick_snapshots, sep_delta
from uedist.engine.attacks.source import features_and_logits
from uedist.engine.attacks.tap import targeted_pgd
from uedist.ops.budget import Budget, measure
from uedist.ops.ntk import CNNKernel, FCKernel, gd_mse_predict

# ------------------------------------------------------------------------------------------------------ budgets


@pytest.mark.parametrize("eps", [0.3, 1.0, 4.0])
def test_l2_budget_holds_after_rounding_and_clipping(eps):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 16, 16), generator=g, dtype=torch.uint8)
    x[:8] = 255  # saturated images: clipping changes the written difference
    for scale in (0.5, 1.0, 3.0):
        delta = torch.randn(x.shape, generator=g) * scale * eps / math.sqrt(768)
        p = Budget("l2", eps).apply(x, delta)
        size = measure(x, p, "l2")
        assert (size <= eps + 1e-12).all()
        if scale >= 1.0:  # the whole budget is used where no pixel saturates
            assert size[8:].mean() > 0.9 * eps


def test_linf_and_l0_budgets():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (8, 3, 8, 8), generator=g, dtype=torch.uint8)
    delta = torch.randn(x.shape, generator=g) * 0.2
    p = Budget("linf", 8).apply(x, delta)
    assert measure(x, p, "linf").max() <= 8
    p0 = Budget("l0", 3).apply(x, delta)
    assert (measure(x, p0, "l0") <= 3).all() and (measure(x, p0, "l0") >= 1).all()
    d = (p0.int() - x.int()).abs().amax(1).flatten(1)  # the kept positions are the largest |δ|
    top = delta.abs().amax(1).flatten(1).topk(3, dim=1).indices
    assert ((d > 0).sum(1) <= 3).all() and all(
        set((d[i] > 0).nonzero().flatten().tolist()) <= set(top[i].tolist()) for i in range(8)
    )


@pytest.mark.parametrize("norm, eps", [("l2", 0), ("linf", 2.5), ("l0", 1.5), ("l1", 1)])
def test_budget_rejects_bad_values(norm, eps):
    with pytest.raises(ValueError):
        Budget(norm, eps)


def _manifest(shards, skipped=()):
    infos = [ShardInfo(f"s{i}", c, "", 0, f"{a:08d}", f"{b:08d}") for i, (a, b, c) in enumerate(shards)]
    return Manifest(
        dataset="x", split="train", classes=["a"], image_size=[8, 8], encoding="png", shards=infos,
        num_samples=sum(c for *_, c in shards), class_counts=[sum(c for *_, c in shards)],
        skipped=[{"key": f"{k:08d}"} for k in skipped],
    )  # fmt: skip


def test_poison_keys_exact_seeded_and_listed():
    m = _manifest([(0, 49, 50), (50, 101, 50)], skipped=[60, 61])
    keys = keys_of(m)
    assert keys is not None and len(keys) == 100 and 60 not in keys and 101 in keys
    a = poison_keys(m, ratio=0.3, seed=0)
    assert len(a) == 30 and a <= set(keys) and a == poison_keys(m, ratio=0.3, seed=0)
    assert a != poison_keys(m, ratio=0.3, seed=1) and poison_keys(m, ratio=1.0, seed=0) is None
    assert keys_of(_manifest([(0, 59, 50)])) is None  # gaps the manifest does not list: no exact draw


# ------------------------------------------------------------------------------------------------- NTK / NTGA


def _empirical_fc(x, *, depth, width, w2, b2, act, seeds=6):
    """NNGP (output covariance) and NTK (J Jᵀ) of finite width-``width`` networks in the NTK parametrization."""
    nngp = ntk = 0
    for s in range(seeds):
        g = torch.Generator().manual_seed(100 + s)
        h, fan, params = x, x.shape[1], []
        for _ in range(depth):
            w = torch.randn(fan, width, generator=g, dtype=torch.float64).requires_grad_(True)
            b = torch.randn(width, generator=g, dtype=torch.float64).requires_grad_(True)
            params += [w, b]
            z = math.sqrt(w2 / fan) * h @ w + math.sqrt(b2) * b
            h, fan = (torch.relu(z) if act == "relu" else torch.erf(z)), width
        w = torch.randn(fan, 1, generator=g, dtype=torch.float64).requires_grad_(True)
        b = torch.randn(1, generator=g, dtype=torch.float64).requires_grad_(True)
        params += [w, b]
        out = (math.sqrt(w2 / fan) * h @ w + math.sqrt(b2) * b).flatten()
        jac = torch.stack(
            [torch.cat([t.flatten() for t in torch.autograd.grad(o, params, retain_graph=True)]) for o in out]
        )
        nngp = nngp + torch.outer(out, out).detach() / seeds
        ntk = ntk + (jac @ jac.T).detach() / seeds
    return nngp, ntk


@pytest.mark.parametrize("act", ["relu", "erf"])
def test_fc_kernel_matches_wide_networks(act):
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(depth=2, w2=1.76, b2=0.18, act=act)
    _, ntk_emp = _empirical_fc(x, width=600, seeds=4, **kw)
    ntk = FCKernel(2, 1.76, 0.18, act, "ntk")(x, x)
    nngp = FCKernel(2, 1.76, 0.18, act, "nngp")(x, x)
    assert torch.allclose(ntk, ntk_emp, rtol=0.08, atol=0.05 * ntk.abs().max())
    assert (torch.diagonal(nngp) < torch.diagonal(ntk)).all()  # Θ = Σ + (positive terms)
    g = torch.Generator().manual_seed(7)  # the NNGP is the covariance of the output over random networks
    mc = torch.zeros(5, 5, dtype=torch.float64)
    for _ in range(1500):
        h, fan = x, x.shape[1]
        for _ in range(2):
            z = math.sqrt(1.76 / fan) * h @ torch.randn(fan, 128, generator=g, dtype=torch.float64)
            z = z + math.sqrt(0.18) * torch.randn(128, generator=g, dtype=torch.float64)
            h, fan = (torch.relu(z) if act == "relu" else torch.erf(z)), 128
        out = math.sqrt(1.76 / fan) * h @ torch.randn(fan, generator=g, dtype=torch.float64) + math.sqrt(
            0.18
        ) * torch.randn((), generator=g, dtype=torch.float64)
        mc += torch.outer(out, out) / 1500
    assert torch.allclose(nngp, mc, rtol=0.15, atol=0.1 * nngp.abs().max())


def _finite_cnn(x, g, *, width, dense, pad, k=5, s=2, w2=1.76, b2=0.18, grad=False):
    """A finite NTGA ``cnn`` surrogate in the NTK parametrization: 2 × (k×k conv, stride s, zero pad ``pad``,
    ReLU), flatten, linear dense layers of widths ``dense``, a scalar readout. Returns (outputs, parameters)."""
    params, h, c = [], x, x.shape[1]
    for _ in range(2):
        w = torch.randn(width, c, k, k, generator=g, dtype=torch.float64).requires_grad_(grad)
        b = torch.randn(width, generator=g, dtype=torch.float64).requires_grad_(grad)
        params += [w, b]
        z = math.sqrt(w2 / (c * k * k)) * F.conv2d(F.pad(h, pad), w, stride=s) + math.sqrt(b2) * b[:, None, None]
        h, c = torch.relu(z), width
    h = h.flatten(1)
    for out in [*dense, 1]:
        w = torch.randn(h.shape[1], out, generator=g, dtype=torch.float64).requires_grad_(grad)
        b = torch.randn(out, generator=g, dtype=torch.float64).requires_grad_(grad)
        params += [w, b]
        h = math.sqrt(w2 / h.shape[1]) * h @ w + math.sqrt(b2) * b
    return h[:, 0], params


@pytest.mark.parametrize("k,pad", [(5, (1, 2, 1, 2)), (3, (0, 1, 0, 1))])  # SAME padding at 8 px, stride 2
def test_cnn_kernel_matches_wide_networks(k, pad):
    x = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ntk = CNNKernel(filter_size=k, stride=2)(x, x)
    nngp = CNNKernel(filter_size=k, stride=2, kind="nngp")(x, x)
    emp = 0  # the NTK is J Jᵀ of wide networks
    for seed in range(3):
        out, ps = _finite_cnn(
            x, torch.Generator().manual_seed(10 + seed), width=256, dense=[512, 512], pad=pad, k=k, grad=True
        )
        jac = torch.stack(
            [torch.cat([t.flatten() for t in torch.autograd.grad(o, ps, retain_graph=True)]) for o in out]
        )
        emp = emp + (jac @ jac.T).detach() / 3
    assert (ntk - emp).abs().max() < 0.06 * ntk.abs().max()
    g, mc = torch.Generator().manual_seed(3), 0  # the NNGP is the output covariance over random networks
    with torch.no_grad():
        for _ in range(3000):
            mc = mc + torch.outer(*[_finite_cnn(x, g, width=64, dense=[128, 128], pad=pad, k=k)[0]] * 2) / 3000
    assert (nngp - mc).abs().max() < 0.05 * nngp.abs().max()
    assert (torch.diagonal(nngp) < torch.diagonal(ntk)).all()


def test_cnn_kernel_blocks_and_shapes():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(7, 3, 12, 12, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.rand(5, 3, 12, 12, generator=g, dtype=torch.float64)
    whole, blocked = CNNKernel()(a, b), CNNKernel(block_entries=40)(a, b)  # one block against checkpointed blocks
    assert torch.allclose(whole, blocked, rtol=1e-12, atol=1e-12)
    (g1,) = torch.autograd.grad(whole.sum(), a)
    (g2,) = torch.autograd.grad(blocked.sum(), a)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-12) and g1.abs().sum() > 0
    assert torch.allclose(CNNKernel()(b, b), CNNKernel()(b, b).T)  # symmetric
    with pytest.raises(ValueError, match="one shape"):
        CNNKernel()(a, b[:, :, :8])


def test_gd_mse_predict_normalizes_time_by_all_outputs():
    """neural-tangents' gradient_descent_mse: exp(−t·λ/(n·k)) in K's eigenbasis, K + diag_reg·tr(K)/n·I."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.arange(12) % 4, 4).double()
    k = FCKernel()
    ktr, kte = k(a, a), k(b, a)
    reg = ktr + 1e-2 * torch.trace(ktr) / 12 * torch.eye(12, dtype=torch.float64)
    lam, v = torch.linalg.eigh(reg)
    by_hand = kte @ v @ torch.diag(-torch.expm1(-3.0 * lam / (12 * 4)) / lam) @ v.T @ y
    assert torch.allclose(gd_mse_predict(ktr, kte, y, t=3.0, diag_reg=1e-2), by_hand, atol=1e-10)


def test_gd_mse_predict_limits():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randn(7, 6, generator=g, dtype=torch.float64)
    k = FCKernel()
    y = torch.nn.functional.one_hot(torch.arange(20) % 3, 3).double()
    ktr, kte = k(a, a), k(b, a)
    inf = gd_mse_predict(ktr, kte, y, t=float("inf"), diag_reg=0.0)
    assert torch.allclose(inf, kte @ torch.linalg.solve(ktr, y), atol=1e-8)
    assert torch.allclose(gd_mse_predict(ktr, kte, y, t=1e6, diag_reg=0.0), inf, atol=1e-5)
    assert gd_mse_predict(ktr, kte, y, t=1e-6, diag_reg=0.0).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["cnn", "fc"])
def test_ntga_block_raises_the_target_loss(arch):
    from uedist.engine.attacks.ntga import NTGAConfig, ntga_block

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 3, 6, 6, generator=g), torch.arange(24) % 3
    xt, yt = torch.rand(30, 3, 6, 6, generator=g), torch.arange(30) % 3
    x = (x + 0.3 * torch.nn.functional.one_hot(y, 3).float().repeat_interleave(36, 1).view(24, 3, 6, 6)).clamp(0, 1)
    xt = (xt + 0.3 * torch.nn.functional.one_hot(yt, 3).float().repeat_interleave(36, 1).view(30, 3, 6, 6)).clamp(0, 1)
    cfg = NTGAConfig(budget=8, t=64.0, arch=arch)
    k = cfg.make_kernel()

    def loss(xb, grad=False):
        xb, y1 = xb.double().requires_grad_(grad), torch.nn.functional.one_hot(y, 3).double()
        f = gd_mse_predict(k(xb, xb), k(xt.double(), xb), y1, t=64.0, diag_reg=1e-4)
        ce = torch.nn.functional.cross_entropy(f, yt)
        return torch.autograd.grad(ce, xb)[0] if grad else ce.item()

    d = ntga_block(k, x, y, target=(xt, yt), cfg=cfg, num_classes=3)
    assert d.dtype == x.dtype and ((x + d) >= 0).all() and ((x + d) <= 1).all()
    assert loss(x + d) > loss(x) + 1e-3
    # the reference rule: one signed step of the whole budget at the clean block
    step = (x.double() + 8 / 255 * loss(x, grad=True).sign()).clamp(0, 1) - x.double()
    assert torch.allclose(d.double(), step, atol=1e-6)
    assert (d.abs() > 8 / 255 - 1e-6).float().mean() > 0.9  # the whole budget, but where [0, 1] clips
    pgd = ntga_block(k, x, y, target=(xt, yt), cfg=NTGAConfig(budget=8, rule="pgd", steps=5, arch=arch), num_classes=3)
    assert pgd.abs().max() <= 8 / 255 + 1e-6 and loss(x + pgd) > loss(x) + 1e-3 and not torch.allclose(pgd, d)


# --------------------------------------------------------------------------------------------- OPS / AR / LSP


def test_ops_scores_equal_the_reference_formula():
    g = np.random.default_rng(0)
    imgs = g.random((40, 3, 4, 5))
    labels = np.arange(40) % 2
    x = torch.tensor(imgs)
    y = torch.tensor(labels)
    sx = torch.zeros(2, 3, 4, 5, dtype=torch.float64).index_add_(0, y, x)
    sxx = torch.zeros(2, 3, 4, 5, dtype=torch.float64).index_add_(0, y, x * x)
    n = torch.bincount(y).double()
    s = ops_scores(sx, sxx, n)
    for k, pos, col in itertools.product(range(2), range(20), range(8)):
        c = np.array([col // 4, (col // 2) % 2, col % 2], float)
        px = imgs[labels == k][:, :, pos // 5, pos % 5]  # (n_k, 3)
        ref = np.mean(np.abs(c - px)) / np.std(np.abs(c - px))
        assert s[k, pos, col].item() == pytest.approx(ref, rel=1e-9)
    picks = ops_search(s, pixels=2, width=5)
    used = [(p["row"], p["col"], tuple(p["colour"])) for ps in picks for p in ps]
    assert len(set(used)) == 4 and all(len(ps) == 2 for ps in picks)


def test_ar_recursion_equals_the_reference_loop():
    b = ar_coefficients(2, seed=0)[torch.tensor([0, 1])]
    start = torch.randn(2, 3, 9, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fast = ar_process(b, start)
    slow = start.clone()
    for n, c in itertools.product(range(2), range(3)):  # the reference's per-entry raster loop
        for i in range(9 - 2):
            for j in range(10 - 2):
                slow[n, c, i + 2, j + 2] = (slow[n, c, i : i + 3, j : j + 3] * b[n, c]).sum()
    assert torch.allclose(fast, slow, rtol=1e-10, atol=1e-12)
    assert torch.allclose(b.sum(dim=(2, 3)), torch.ones(2, 3, dtype=torch.float64)) and (b[..., 2, 2] == 0).all()


def test_lsp_noise_is_per_key_class_separable_and_at_budget():
    cfg = LSPConfig(l2=1.0, patch_size=4)
    make = lsp_delta(cfg, num_classes=4, size=(16, 16))
    y = torch.arange(200) % 4
    keys = [f"{i:08d}" for i in range(200)]
    d = make(torch.zeros(200, 3, 16, 16), y, keys)
    assert torch.allclose(d.flatten(1).norm(dim=1), torch.ones(200, dtype=d.dtype), atol=1e-5)
    again = make(torch.zeros(5, 3, 16, 16), y[7:12], keys[7:12])  # another batch: the same δ per key
    assert torch.allclose(again, d[7:12])
    assert (d[:, :, :4, :4] == d[:, :, :1, :1]).all()  # constant over each patch cell
    feats = torch.cat([d[:, :, ::4, ::4].flatten(1), torch.ones(200, 1)], 1).double()  # one value per cell
    w = torch.linalg.lstsq(feats, torch.nn.functional.one_hot(y, 4).double(), driver="gelsd").solution  # linear
    assert ((feats @ w).argmax(1) == y).float().mean() == 1.0


# ------------------------------------------------------------------------------------------------- TAP / SEP


def _tiny_net(seed=0, classes=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes)
    )


def test_targeted_pgd_lowers_the_target_loss_within_the_ball():
    net = _tiny_net()
    x = torch.rand(32, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.arange(32) % 3
    d, loss = targeted_pgd(
        net, x, t, eps=8 / 255, alpha=1 / 255, steps=20, aug=lambda z: z, gen=torch.Generator().manual_seed(0)
    )
    before = torch.nn.functional.cross_entropy(net(x), t, reduction="none")
    assert d.abs().max() <= 8 / 255 + 1e-7 and loss.mean() < before.mean()


def test_sep_pulls_features_to_the_wrong_class_centroid():
    models = [_tiny_net(s).eval() for s in range(3)]
    x = torch.rand(30, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.arange(30) % 3
    with torch.no_grad():
        cents = [torch.stack([features_and_logits(m, x[y == k])[0].mean(0) for k in range(3)]) for m in models]
    from uedist.engine.attacks.sep import SEPConfig

    cfg = SEPConfig(budget=8, steps=4, vr_steps=3, num_models=3, source_snapshots=3)
    d = sep_delta(cfg, models=models, cents=cents, num_classes=3)(x, y, [f"{i:08d}" for i in range(30)])
    target = (y + 1) % 3

    def dist(z):
        return sum(((features_and_logits(m, z)[0] - c[target]) ** 2).mean() for m, c in zip(models, cents)).item()

    assert d.abs().max() <= 8 / 255 + 1e-7 and dist(x + d) < dist(x)
    files = [f"s{i}" for i in range(10)]
    assert pick_snapshots(files, 5) == ["s1", "s3", "s5", "s7", "s9"] and pick_snapshots(files, 1) == ["s9"]


# --------------------------------------------------------------------------------------------------- end to end
# Every registered attack runs end to end at its @stage(smoke=...) size, its declared budget checked on every written
# sample and 2 processes writing what 1 does, in tests/test_stages_smoke.py (parametrized over the registry). Here:
# partial poisoning and a killed job, for one attack each.


@pytest.fixture(scope="module")
def source_run(synth_sets, tmp_path_factory):
    """A clean victim of the synthetic set with 4 snapshots: the source model of TAP and SEP."""
    root = tmp_path_factory.mktemp("src")
    args = [f"run_root={root}", "name=src", f"data.train={synth_sets / 'train'}", f"data.test={synth_sets / 'test'}"]
    args += ["epochs=0", "steps=8", "model.width=0.125", "data.batch_size=32", "data.workers=0", "progress=false"]
    cmd = [sys.executable, str(REPO / "launch/victim.py"), "--config", "configs/victim/synthetic.yaml", *args]
    r = subprocess.run([*cmd, "snapshots=4"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "src"


def _attack_args(method, sets, root, name, source):
    """The smoke run of ``method`` (its @stage(smoke=...) overrides) on ``sets``; ``source``: a clean victim run."""
    st = get_stage(method, "attack")
    args = [f"method={method}", *st.smoke, f"name={name}", f"run_root={root}", f"data.train={sets / 'train'}"]
    args += [f"data.test={sets / 'test'}", "data.workers=0", "progress=false"]
    return args + ([f"source_model={source}"] if source else [])


def _noise(args, timeout=600):
    return subprocess.run(
        [sys.executable, str(REPO / "launch/attack.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_poison_ratio_poisons_exactly_the_listed_keys(synth_sets, tmp_path):
    r = _noise(_attack_args("lsp", synth_sets, tmp_path, "part", None) + ["poison_ratio=0.25"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "part" / "poisoned"
    info = load_manifest(out).extra["noise"]["poison"]
    assert info["ratio"] == 0.25 and len(info["keys"]) == 60 and info["rule"] == "exact seeded draw"
    listed = {f"{k:08d}" for k in info["keys"]}
    for a, b in zip(iter_samples(synth_sets / "train"), iter_samples(out), strict=True):
        same = (decode_image(a.data, a.ext) == decode_image(b.data, b.ext)).all()
        assert same == (a.key not in listed), a.key
    assert "60 of 240 samples changed" in r.stdout


@pytest.mark.slow
def test_killed_attack_resumes_to_identical_shards(synth_sets, source_run, tmp_path):
    args = _attack_args("tap", synth_sets, tmp_path, "ref", source_run)
    args = [a for a in args if not a.startswith(("steps=", "restarts="))] + ["steps=40", "restarts=1"]
    ref = _noise(args)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = [a.replace("name=ref", "name=kill") for a in args]
    out = tmp_path / "kill" / "poisoned"
    _kill_when([sys.executable, str(REPO / "launch/attack.py"), *killed], lambda: any(out.glob("shard-*.tar")))
    assert 0 < len(list(out.glob("shard-*.tar"))) < 6
    again = _noise(killed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _shards(out) == _shards(tmp_path / "ref" / "poisoned")


def test_a_budget_violation_stops_the_pass(synth_sets, tmp_path):
    from uedist.dist import make_accelerator
    from uedist.engine.attacks.base import write_poisoned
    from uedist.engine.attacks.lsp import LSPConfig

    class Leaky(Budget):  # a broken attack: writes past its own budget
        def apply(self, x_u8, delta):
            return (x_u8.int() + 40).clamp(0, 255).to(torch.uint8)

    cfg = LSPConfig(method="lsp", name="leak", run_root=str(tmp_path), progress=False)
    cfg.data.train, cfg.data.workers = str(synth_sets / "train"), 0
    with pytest.raises(RuntimeError, match="exceed the budget"):
        write_poisoned(
            cfg,
            make_accelerator(),
            tmp_path / "leak",
            make_delta=lambda x, y, k: x * 0,
            stage="t",
            budget=Leaky("l2", 1.0),
        )


def test_ar_windows_are_stable_and_told_apart():
    """The reference's search criteria: bounded patterns, own filter blind to its pattern, the others respond."""
    from uedist.engine.attacks.ar import _response

    b = ar_coefficients(4, seed=0)
    raw = ar_process(b, torch.randn(4, 3, 36, 36, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    raw = raw[:, :, 4:, 4:]
    norms = raw.flatten(1).norm(dim=1)
    assert torch.isfinite(norms).all() and norms.max() <= 50
    pats = raw / norms.view(-1, 1, 1, 1)
    for i in range(4):
        assert float(_response(b[i], pats[i : i + 1])) < 1e-9  # every entry obeys its own recursion
        assert all(float(_response(b[j], pats[i : i + 1])) > 1.0 for j in range(i))
