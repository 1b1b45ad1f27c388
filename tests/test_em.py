"""EM units (uedist.ops.em, uedist.engine.attacks.em): the class-wise reference rule against a hand computation, its
combination across ranks, the old summed rule, and the reference's surrogate settings (no normalization, no
augmentation, gradient clip, zero start). The EM job end to end: tests/test_noise_job.py."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import uedist.engine.attacks.em as em
from uedist.config import load_config
from uedist.data.manifest import load_manifest
from uedist.engine.attacks.em import EMConfig
from uedist.ops.em import classwise_reference_sums, classwise_reference_update
from uedist.ops.images import CIFAR10_MEAN, IMAGENET_MEAN, to_unit

EPS, ALPHA = 8 / 255, 2 / 255


class FakeAcc:
    """An accelerator of ``world`` identical ranks: ``reduce(sum)`` multiplies by the world size."""

    def __init__(self, world: int = 1) -> None:
        self.device, self.num_processes, self.process_index, self.world = torch.device("cpu"), world, 0, world

    def reduce(self, t, reduction="sum"):
        assert reduction == "sum"
        return t * self.world


def _tiny(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, k))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.rand(7, 3, 2, 2, generator=g)
    x[0, 0, 0, 0], x[1, 1, 1, 1] = 0.0, 1.0  # pixels at the range's ends: z is clipped, η is not
    y = torch.tensor([0, 0, 1, 0, 1, 1, 0])  # class 2 absent: its noise is kept
    noise = (torch.rand(k, 3, 2, 2, generator=g) * 2 - 1) * EPS
    return model, x, y, noise


def _by_hand(model, x, y, noise):
    """The reference's loop: per sample, one signed step from its class noise; per class, the mean; clamp."""
    out = noise.clone()
    for c in y.unique().tolist():
        etas = []
        for i in (y == c).nonzero().flatten().tolist():
            z = (x[i : i + 1] + noise[c]).clamp(0, 1).requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(z), y[i : i + 1]), z)
            etas.append((z.detach() - ALPHA * g.sign() - x[i : i + 1]).clamp(-EPS, EPS)[0])
        out[c] = torch.stack(etas).mean(0).clamp(-EPS, EPS)
    return out


def _cfg(*overrides):
    return load_config(EMConfig, None, ["method=em", "budget=8", "noise_step_size=2", *overrides])


def test_classwise_reference_rule_by_hand(monkeypatch):
    model, x, y, noise = _tiny()
    want = _by_hand(model, x, y, noise)
    sums, counts = classwise_reference_sums(model, x, y, noise, eps=EPS, alpha=ALPHA, eot=lambda z: z)
    assert counts.tolist() == [4.0, 3.0, 0.0]
    got = classwise_reference_update(noise, sums, counts, eps=EPS)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[2], noise[2]) and got.abs().max() <= EPS + 1e-7
    # one step of the class-wise pass through the engine (one batch; uint8 images as the loader gives them)
    x8 = (x * 255).round().to(torch.uint8)
    monkeypatch.setattr(em, "classwise_batches", lambda *a, **k: [{"image": x8, "label": y}])
    m = SimpleNamespace(image_size=(2, 2), num_classes=3)
    for world in (1, 2):  # sums and counts all-reduced: two identical ranks give the one-rank mean
        out = em._classwise_update(_cfg(), model, m=m, noise=noise, eot=lambda z: z, rnd=0, accelerator=FakeAcc(world))
        torch.testing.assert_close(out, _by_hand(model, to_unit(x8), y, noise))


def test_classwise_summed_rule_still_available(monkeypatch):
    """em.rule=summed: K_u signed steps of the batch-summed gradient, the gradient summed across ranks."""
    model, x, y, noise = _tiny()
    x8 = (x * 255).round().to(torch.uint8)
    monkeypatch.setattr(em, "classwise_batches", lambda *a, **k: [{"image": x8, "label": y}])
    n = noise.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model((to_unit(x8) + n[y]).clamp(0, 1)), y), n)
    want = (noise - ALPHA * g.sign()).clamp(-EPS, EPS)
    m = SimpleNamespace(image_size=(2, 2), num_classes=3)
    out = em._classwise_update(
        _cfg("em.rule=summed"), model, m=m, noise=noise, eot=lambda z: z, rnd=0, accelerator=FakeAcc(2)
    )
    torch.testing.assert_close(out, want)
    assert not torch.equal(out, _by_hand(model, to_unit(x8), y, noise))


def test_classwise_pass_size(synth_sets):
    """reference: ⌈subset·N / batch⌉ global batches of em.batch_size, split across ranks; summed: K_u batches."""
    m = load_manifest(synth_sets / "train")  # 240 samples
    cfg = _cfg(f"data.train={synth_sets / 'train'}", "em.batch_size=16", "data.workers=0")
    batches = list(em.classwise_batches(cfg, m, rnd=0, accelerator=FakeAcc(2)))
    assert len(batches) == 3 and all(len(b["label"]) == 8 for b in batches)  # ⌈0.2·240 / 16⌉ = 3, 16 / 2 ranks
    cfg = _cfg(f"data.train={synth_sets / 'train'}", "em.batch_size=16", "em.rule=summed", "noise_steps=4")
    assert len(list(em.classwise_batches(cfg, m, rnd=0, accelerator=FakeAcc(1)))) == 4
    with pytest.raises(ValueError, match="not divisible"):
        em.classwise_batches(_cfg("em.batch_size=15"), m, rnd=0, accelerator=FakeAcc(2))


def test_zero_start():
    """The first noise is zero by default (reference); em.start=random is the seeded uniform start (ours)."""
    m = SimpleNamespace(image_size=(4, 4), num_classes=3)
    assert torch.equal(em.initial_classwise(_cfg(), m, torch.device("cpu")), torch.zeros(3, 3, 4, 4))
    rnd = em.initial_classwise(_cfg("em.start=random"), m, torch.device("cpu"))
    assert rnd.abs().max() <= EPS and (rnd != 0).float().mean() > 0.9
    model, _, _, _ = _tiny()
    x = torch.rand(4, 3, 2, 2) * 0.5 + 0.25  # inside the range: no pixel clipping
    y, keys = torch.tensor([0, 1, 2, 0]), ["5", "6", "7", "8"]
    d = em._delta(_cfg("noise_steps=1"), model, x, y=y, start=None, keys=keys)
    assert set((d * 255).round().unique().tolist()) <= {-2.0, 0.0, 2.0}  # one step of 2/255 from zero
    torch.testing.assert_close(d.abs(), torch.full_like(d, ALPHA))
    d = em._delta(_cfg("noise_steps=1", "em.start=random"), model, x, y=y, start=None, keys=keys)
    assert not torch.allclose(d.abs(), torch.full_like(d, ALPHA))


def test_surrogate_defaults_unnormalized_no_augmentation(synth_sets):
    m = load_manifest(synth_sets / "train")
    x = torch.rand(2, 3, 16, 16)
    net = em.em_surrogate(_cfg(), m)
    assert torch.equal(net.mean, torch.zeros(1, 3, 1, 1)) and torch.equal(net.std, torch.ones(1, 3, 1, 1))
    assert em.em_eot(_cfg(), m, torch.Generator())(x) is x
    ours = em.em_surrogate(_cfg("em.normalize=true"), m)
    assert torch.allclose(ours.mean.flatten(), torch.tensor(IMAGENET_MEAN if m.dataset != "cifar10" else CIFAR10_MEAN))
    assert not torch.equal(em.em_eot(_cfg("em.augment=true"), m, torch.Generator().manual_seed(0))(x), x)


@pytest.mark.parametrize("clip", [1e-3, 0.0])
def test_surrogate_round_settings(synth_sets, tmp_path, clip):
    """A training round reads em.batch_size images of the poisoned set as they are (no augmentation, [0, 1] into
    the network) and clips the gradient norm to em.grad_clip (0 = off)."""
    from uedist.dist import make_accelerator
    from uedist.engine.train.loop import Tracker, prepare_training, train_batches

    acc = make_accelerator(cpu=True)
    cfg = _cfg(
        f"data.train={synth_sets / 'train'}",
        "data.workers=0",
        "em.batch_size=24",
        "em.train_steps=2",
        f"em.grad_clip={clip}",
        "surrogate.width=0.125",
        "progress=false",
    )
    m = load_manifest(cfg.data.train)
    torch.manual_seed(0)
    p = prepare_training(
        em.em_surrogate(cfg, m), cfg.optim, 2, accelerator=acc, ckpt_root=tmp_path, seed=0, config=cfg, ckpt_every=0
    )
    seen = []
    p.model.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    eot = em.em_eot(cfg, m, p.gen)
    em._train_round(cfg, p, data=synth_sets / "train", eot=eot, rnd=0, tracker=Tracker("", tmp_path / "tb", acc))
    data = [dict(b) for b in train_batches(
        SimpleNamespace(**{**vars(cfg.data), "batch_size": 24}), p, total=2, seed=cfg.seed * 7, accelerator=acc,
        src=str(synth_sets / "train"), start=0,
    )]  # fmt: skip
    assert len(seen) == 2 and all(s.shape[0] == 24 for s in seen)
    for s, b in zip(seen, data):
        torch.testing.assert_close(s, to_unit(b["image"]))  # the stored images, unnormalized, unaugmented
    norm = torch.cat([q.grad.flatten() for q in p.model.parameters() if q.grad is not None]).norm()
    assert (norm <= clip * 1.01) if clip else (norm > 1e-2)


def test_shipped_em_configs_use_the_reference_rule():
    from tests.conftest import REPO

    for f in sorted((REPO / "configs" / "em").glob("*.yaml")):
        e = load_config(EMConfig, f).em
        assert (e.rule, e.subset, e.batch_size, e.normalize, e.grad_clip, e.start) == (
            "reference",
            0.2,
            512,
            False,
            5.0,
            "zero",
        ), f
        # the reference's unaugmented surrogate, but at CPU scale (where it does not protect: docs/noise.md)
        assert e.augment == f.name.endswith("_cpu.yaml"), f
