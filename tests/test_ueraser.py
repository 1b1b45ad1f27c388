"""UEraser adversarial augmentations: the ops (shape, range, seeds, per-image draws), the plasma fractal, the
max-over-draws loss, config validation and a short victim run with ueraser=max."""

import json
import math

import pytest
import torch

from tests.conftest import REPO
from uedist.config import ConfigError, load_config
from uedist.engine.train.victim import DefenseConfig, VictimConfig
from uedist.ops import ueraser as U

OPS = {
    "plasma_brightness": U.plasma_brightness,
    "plasma_contrast": U.plasma_contrast,
    "channel_shuffle": U.channel_shuffle,
    "trivial_augment": U.trivial_augment,
    "ueraser_augment": U.ueraser_augment,
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batch(b=8, c=3, size=16, device="cpu"):
    """``b`` copies of one random image (so differences between outputs come from the per-image draws)."""
    img = torch.rand(1, c, size, size, generator=torch.Generator().manual_seed(123))
    return img.expand(b, -1, -1, -1).contiguous().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_shape_range_seeded_and_per_image(name, device):
    x = _batch(device=device)
    a = OPS[name](x, gen=torch.Generator().manual_seed(0))
    b = OPS[name](x, gen=torch.Generator().manual_seed(0))
    c = OPS[name](x, gen=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b), "same seed, same output"
    assert not torch.equal(a, c), "another seed, another output"
    assert any(not torch.equal(a[0], a[i]) for i in range(1, len(a))), "images of a batch draw their own parameters"


@pytest.mark.parametrize("name,low,high", U.TA_OPS)
def test_each_trivial_augment_op_keeps_range_and_acts(name, low, high):
    x = torch.rand(4, 3, 12, 10, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1  # non-square, not flat
    changed = False
    for m in (low, high, (low + high) / 2 + 0.05):
        y = U.trivial_augment_op(x, name, torch.full((4,), m))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1, (name, m)
        changed |= not torch.allclose(y, x, atol=1e-6)
    assert changed, f"{name} never changed the image over its range"


def test_trivial_augment_op_details():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(U.trivial_augment_op(x, "rotate", torch.zeros(2)), x, atol=1e-5)  # 0 degrees: identity
    assert torch.allclose(U.trivial_augment_op(x, "sharpness", torch.ones(2)), x)  # factor 1: identity
    shifted = U.trivial_augment_op(x, "translate_x", torch.full((2,), 0.25))  # 2 px of 8
    assert torch.allclose(shifted[..., 2:], x[..., :-2], atol=1e-5) and shifted[..., :2].abs().max() == 0
    eq = U.trivial_augment_op(x, "equalize", torch.zeros(2))
    assert eq.amax((2, 3)).min() > 0.95  # equalised channels span the range
    post = U.trivial_augment_op(x, "posterize", torch.full((2,), 2.0))  # 2 bits: 4 levels
    assert len(torch.unique(post)) <= 4


def test_channel_shuffle_permutes_channels():
    x = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    y = U.channel_shuffle(x, p=1.0, gen=torch.Generator().manual_seed(0))
    for i in range(16):  # each output channel is one input channel of the same image
        assert sorted(y[i].sum((1, 2)).tolist()) == pytest.approx(sorted(x[i].sum((1, 2)).tolist()))
    assert torch.equal(U.channel_shuffle(x, p=0.0, gen=torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (24, 40), (3, 3)])
def test_diamond_square_statistics(size):
    h, w = size
    r = torch.full((32,), 0.5)
    f = U.diamond_square((32, 3, h, w), r, gen=torch.Generator().manual_seed(0))
    assert f.shape == (32, 3, h, w) and torch.isfinite(f).all()
    assert f.min() >= 0 and f.max() <= 2  # kornia's unnormalised field: about [0, 1], borders compensated x4/3
    assert 0.2 < f.mean() < 0.8 and (f.flatten(2).std(2) > 1e-3).all(), "every field varies"
    assert not torch.allclose(f[:, 0], f[:, 1]), "independent fields per channel"


def test_diamond_square_is_a_fractal():
    """Neighbouring pixels are more alike than far ones, and roughness adds fine-scale variation."""
    gen = torch.Generator().manual_seed(0)
    smooth = U.diamond_square((64, 1, 33, 33), torch.full((64,), 0.3), gen=gen)
    rough = U.diamond_square((64, 1, 33, 33), torch.full((64,), 0.7), gen=gen)
    near = (smooth[..., 1:] - smooth[..., :-1]).abs().mean()
    far = (smooth[..., 16:] - smooth[..., :-16]).abs().mean()
    assert near < 0.5 * far
    assert (rough[..., 1:] - rough[..., :-1]).abs().mean() > 1.5 * near
    with pytest.raises(ValueError, match="H, W >= 3"):
        U.diamond_square((1, 1, 2, 8), torch.ones(1))


def test_max_loss_is_at_least_the_mean_on_the_same_draws():
    k, b = 5, 8
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(k * b, 4, generator=gen)
    y = torch.randint(0, 4, (b,), generator=gen)
    lmax = U.repeat_loss(logits, y, k)
    lmean = U.repeat_loss(logits, y, k, reduce="mean")
    assert lmax >= lmean
    per = torch.nn.functional.cross_entropy(logits, y.repeat(k), reduction="none").view(k, b)
    assert lmax == pytest.approx(per.max(0).values.mean().item())
    one = U.repeat_loss(logits[:b], y, 1)
    assert one == pytest.approx(torch.nn.functional.cross_entropy(logits[:b], y).item())


def test_max_phase_schedule():
    d = DefenseConfig(ueraser="max", ueraser_repeats=5, ueraser_max_frac=0.25)
    assert [d.draws(s, 8) for s in range(1, 9)] == [5, 5, 1, 1, 1, 1, 1, 1]
    assert DefenseConfig(ueraser="lite").draws(1, 8) == 1
    assert DefenseConfig(ueraser="max", ueraser_max_frac=1.0).draws(8, 8) == 5  # LSP's --mode em


@pytest.mark.parametrize(
    "override,message",
    [
        ("defense.ueraser=maxx", "defense.ueraser"),
        ("defense.ueraser_max_frac=1.5", "ueraser_max_frac"),
        ("defense.ueraser_max_frac=-0.1", "ueraser_max_frac"),
        ("defense.ueraser_repeats=1", "ueraser_repeats: must be >= 2"),
        ("defense.mixup=1.0", "mixup / cutmix"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(VictimConfig, None, ["steps=1", "defense.ueraser=max", override])


def test_config_accepts_lite_with_mixup_and_the_shipped_config():
    cfg = load_config(VictimConfig, None, ["steps=1", "defense.ueraser=lite", "defense.mixup=1.0"])
    assert cfg.defense.ueraser == "lite"
    shipped = load_config(VictimConfig, REPO / "configs/victim/cifar10_quick_ueraser.yaml")
    d = shipped.defense
    assert (d.ueraser, d.ueraser_repeats, d.ueraser_max_frac) == ("max", 5, 0.25) and shipped.model.width == 0.25


@pytest.mark.parametrize("extra", [[], ["adv.enabled=true", "adv.steps=1", "adv.step_size=2"]], ids=["std", "at"])
def test_victim_run_with_ueraser_max_trains(synth_sets, tmp_path, monkeypatch, extra):
    from uedist.app.jobs import run_stage_main

    calls = []

    def counted(logits, y, repeats, **kw):
        calls.append((logits.shape[0], y.shape[0], repeats))
        return loss_fn(logits, y, repeats, **kw)

    loss_fn = U.repeat_loss
    monkeypatch.setattr(U, "repeat_loss", counted)
    args = [
        f"data.train={synth_sets / 'train'}",
        f"data.test={synth_sets / 'test'}",
        f"run_root={tmp_path}",
        "name=ue",
        "model.width=0.125",
        "data.batch_size=16",
        "data.workers=0",
        "epochs=0",
        "steps=4",
        "log_every=1",
        "progress=false",
        "defense.ueraser=max",
        "defense.ueraser_repeats=3",
        "defense.ueraser_max_frac=0.5",  # steps 1-2 max over 3 draws, steps 3-4 lite
        *extra,
    ]
    assert run_stage_main("victim", args, default_method="victim") == 0
    m = json.loads((tmp_path / "ue" / "metrics.json").read_text())
    losses = [r["train_loss"] for r in m["curve"] if "train_loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert m["steps"] == 4 and m["test_samples"] == 80
    assert calls == [(48, 16, 3)] * 2, "the max loss over 3 draws in the first half of the steps only"
