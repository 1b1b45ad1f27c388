"""D-VAE: the model (shapes, reference layout, gradients, the loss of Eq. 14), the two-stage job end to end
(P¹, P², P³ as verified shard sets with provenance, metrics, grid), bad input, SIGKILL in each training phase and
in an inference pass (the rerun completes with the same bytes), and two CPU processes under DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.test_noise_resume import _kill_when
from uedist.data.manifest import load_manifest
from uedist.data.shards import iter_samples, verify_shard_set
from uedist.models.dvae import DVAE, DVAEOutput, dvae_loss, kld

# A tiny D-VAE on the 16 px, 4-class synthetic set: seconds per run.
TINY = [
    "model.width=0.125",
    "model.latent_dim=8",
    "data.batch_size=32",
    "data.infer_batch_size=40",
    "data.workers=1",
    "log_every=2",
    "progress=false",
    "data.num_classes=4",
    "data.image_size=16",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _cmd(sets, root, name, *extra, script="launch/dvae.py"):
    return [
        sys.executable,
        str(REPO / script),
        f"name={name}",
        f"run_root={root}",
        f"data.src={sets / 'train'}",
        f"data.clean={sets / 'train'}",
        *TINY,
        *extra,
    ]


def _shards(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def test_reference_layout_at_32px():
    m = DVAE(10)  # yuyi-sd/D-VAE ResNet18DVAE(stem_end_block=7, latent_dim=256) with spatial_emb
    out = m(torch.rand(2, 3, 32, 32), torch.tensor([0, 9]))
    assert out.rec.shape == out.p.shape == (2, 3, 32, 32)
    assert out.mu.shape == out.logvar.shape == (2, 256, 16, 16)
    assert m.emb_p.weight.shape == (10, 128 * 16 * 16)
    assert 0 <= out.rec.min() and out.rec.max() <= 1  # sigmoid on x̂, none on p̂
    assert out.p.min() < 0


@pytest.mark.parametrize("size,latent_blocks,emb_grid", [(16, 0, 16), (28, 1, 4), (24, 0, 0)])
def test_shapes_and_gradients(size, latent_blocks, emb_grid):
    m = DVAE(3, latent_dim=4, width=0.125, latent_blocks=latent_blocks, emb_grid=emb_grid).train()
    x = torch.rand(3, 3, size, size)
    out = m(x, torch.tensor([0, 1, 2]))
    assert out.mu.shape == (3, 4, size // 2, size // 2)  # the latent keeps the H/2 ratio at every size
    loss, terms = dvae_loss(out, x, kld_limit=0.0, kld_weight=0.01, p_floor=0.0)
    assert torch.isfinite(loss) and set(terms) == {"loss", "rec", "rec_p", "kld", "p_sq"}
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_kld_and_loss_terms():
    mu, logvar = torch.zeros(2, 5, 3, 3), torch.zeros(2, 5, 3, 3)
    assert kld(mu, logvar).item() == 0
    mu = torch.ones(2, 5, 3, 3)  # KL per channel 0.5, summed over 5 channels, averaged over positions
    assert kld(mu, logvar).item() == pytest.approx(2.5)
    x = torch.ones(2, 3, 4, 4)  # white: clip(x̂ + p̂) = x for p̂ > 0, so only the floor could move p̂
    mu = torch.full((2, 5, 2, 2), 0.1, requires_grad=True)
    p = torch.full_like(x, 0.01, requires_grad=True)
    out = DVAEOutput(x.clone(), p, mu, torch.zeros_like(mu))
    loss, t = dvae_loss(out, x, kld_limit=1.0, kld_weight=0.5, p_floor=0.002)
    loss.backward()
    assert mu.grad.abs().max() == 0  # KLD 0.025 below the limit: max(KLD, limit) has no gradient
    assert p.grad.abs().max() == 0  # mean(p̂²) = 1e-4 is below the floor 0.002: max(·, floor) has no gradient
    assert t["kld"].item() == pytest.approx(0.025) and t["rec"].item() == t["rec_p"].item() == 0
    assert loss.item() == pytest.approx(0.5 * 1.0 + 0.002)


@pytest.fixture(scope="module")
def finished(synth_sets, tmp_path_factory):
    root = tmp_path_factory.mktemp("dvae")
    r = subprocess.run(
        _cmd(synth_sets, root, "ref", "steps=16", "ckpt_every=4"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return root / "ref", r.stdout


@pytest.mark.slow
def test_two_stages_write_three_sets_with_provenance(synth_sets, finished):
    run, stdout = finished
    src = load_manifest(synth_sets / "train")
    parent = synth_sets / "train"
    for name in ("p1", "p2", "purified"):
        assert verify_shard_set(run / name).ok
        m = load_manifest(run / name)
        assert m.encoding == "png" and m.num_samples == src.num_samples and m.classes == src.classes
        assert m.provenance["stage"] == f"purify:dvae:{name}"
        assert m.provenance["parents"][0] == str(parent.resolve())
        assert m.extra["purify"]["stage"] == (1 if name == "p1" else 2)
        parent = run / name
    a, b = list(iter_samples(synth_sets / "train")), list(iter_samples(run / "purified"))
    assert [(s.key, s.label) for s in a] == [(s.key, s.label) for s in b]
    met = json.loads((run / "metrics.json").read_text())
    for k in ("p1", "p2", "purified_stats"):
        assert {"kld", "rec_mse", "rec_psnr", "psnr_input_vs_clean", "psnr_output_vs_clean", "p_cos_vs_true"} <= set(
            met[k]
        )
    assert met["p1"]["psnr_input_vs_clean"] == 100.0  # the fixture passes the clean set as its own "poisoned" set
    assert met["stage1"]["steps"] == met["stage2"]["steps"] == 16 and met["stage2"]["kld_limit"] == 3.0
    assert met["stage1"]["kld_weight"] == 0.01
    assert (run / "grid.png").stat().st_size > 1000 and (run / "stage2_curve.csv").is_file()
    assert "D-VAE purification" in stdout and "P3 = rec(P2)" in stdout


@pytest.mark.slow
def test_rerun_reuses_everything(synth_sets, finished):
    run, _ = finished
    before = _shards(run / "purified")
    r = subprocess.run(
        _cmd(synth_sets, run.parent, "ref", "steps=16", "ckpt_every=4"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(reused)" in r.stdout and "already complete" in r.stdout + r.stderr
    assert _shards(run / "purified") == before


@pytest.mark.parametrize(
    "override,needle",
    [
        ("data.num_classes=10", "classes 4 (config expects 10)"),
        ("data.image_size=32", "image size 16 (config expects 32)"),
        ("data.num_samples=999", "samples 240 (config expects 999)"),
    ],
)
def test_input_that_differs_from_the_config_is_a_clear_error(synth_sets, tmp_path, override, needle):
    from uedist.config import load_config
    from uedist.dist import make_accelerator
    from uedist.engine.purifiers.baselines import PurifyInputError
    from uedist.engine.purifiers.dvae import DVAEConfig, purify_dvae

    cfg = load_config(DVAEConfig, None, _cmd(synth_sets, tmp_path, "bad", "steps=2", override)[2:])
    with pytest.raises(PurifyInputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        purify_dvae(cfg, make_accelerator(), tmp_path / "bad")
    assert not (tmp_path / "bad" / "stage1").exists()


@pytest.mark.slow
def test_clean_set_sharded_differently_is_refused(synth_sets, tmp_path):  # and the launcher exits 2
    r = subprocess.run(
        _cmd(synth_sets, tmp_path, "bad", "steps=2", f"data.clean={synth_sets / 'test'}"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert r.returncode == 2 and "not sharded like" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.slow
def test_killed_in_every_phase_resumes_to_identical_sets(synth_sets, tmp_path, finished):
    """SIGKILL mid stage-1 training, mid P¹ pass, mid stage-2 training, mid P³ pass; each rerun resumes; the last
    completes with shard sets byte-identical to the uninterrupted run's."""
    ref, _ = finished
    run = tmp_path / "killed"
    cmd = _cmd(synth_sets, tmp_path, "killed", "steps=16", "ckpt_every=4", script="tests/scripts/dvae_slow_pass.py")

    def ckpt(stage, at):
        f = run / f"stage{stage}" / "checkpoints" / "latest"
        return lambda: f.is_file() and f.read_text().strip() >= f"step-{at:08d}"

    def shards_done(name):
        d = run / name / "_progress"
        return lambda: d.is_dir() and len(list(d.glob("shard-*.json"))) >= 1

    for ready in (ckpt(1, 8), shards_done("p1"), ckpt(2, 8), shards_done("purified")):
        _kill_when(cmd, ready)
    assert not (run / "purified" / "manifest.json").exists()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already written" in r.stdout + r.stderr
    for name in ("p1", "p2", "purified"):
        assert verify_shard_set(run / name).ok
        assert _shards(run / name) == _shards(ref / name), name


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_ddp(synth_sets, tmp_path):
    from tests.test_multiprocess import accelerate_launch

    r = accelerate_launch(
        str(REPO / "launch/dvae.py"),
        "name=ddp",
        f"run_root={tmp_path}",
        f"data.src={synth_sets / 'train'}",
        *TINY,
        "steps=4",
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    met = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    for st in ("stage1", "stage2"):
        assert met[st]["world_size"] == 2 and met[st]["wrapper"] == "DistributedDataParallel"
        assert met[st]["ranks_in_sync"]
    assert verify_shard_set(tmp_path / "ddp" / "purified").ok
    assert "psnr_output_vs_clean" not in met["purified_stats"]  # no clean set given


def test_each_inference_pass_draws_its_own_latent_noise(synth_sets, tmp_path, monkeypatch):
    """P¹, P² and P³ sample z with noise seeded by key *and* pass: P² and P³ (both stage 2) must not share it."""
    from uedist.config import load_config
    from uedist.data.manifest import load_manifest
    from uedist.dist import make_accelerator
    from uedist.engine.purifiers import dvae as eng

    cfg = load_config(
        eng.DVAEConfig,
        None,
        [f"data.src={synth_sets / 'train'}", "model.width=0.125", "progress=false", "data.workers=0"],
    )
    model = eng.build_dvae(cfg, load_manifest(synth_sets / "train"))
    seen, real = [], model.forward

    def spy(x, y, **kw):
        seen.append(kw["noise"][0].clone())
        return real(x, y, **kw)

    monkeypatch.setattr(model, "forward", spy)
    firsts = []
    for stage, what in ((1, "x_minus_p"), (2, "x_minus_p"), (2, "rec")):
        seen.clear()
        eng.dvae_pass(cfg, model, stage=stage, what=what, src=synth_sets / "train", dst=tmp_path / f"{stage}{what}",
                      accelerator=make_accelerator(), clean=None)  # fmt: skip
        firsts.append(seen[0])
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])


def test_fit_stats_score_how_well_p_hat_matches_the_true_perturbation():
    """cos(p̂, x − clean) per image: 1 when p̂ is the perturbation, -1 when its negative, about 0 when unrelated."""
    from uedist.engine.purifiers.dvae import FitStats

    class One:
        num_processes = 1

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(6, 3, 8, 8, generator=g)
    delta = (torch.rand(6, 3, 8, 8, generator=g) - 0.5) * 0.06
    x = clean + delta
    for p, want in ((delta, 1.0), (-delta, -1.0), (torch.randn(6, 3, 8, 8, generator=g), 0.0)):
        fit = FitStats(torch.device("cpu"))
        fit.update(x, p, clean)
        r = fit.result(One())
        assert abs(r["p_cos_vs_true"] - want) < (0.15 if want == 0 else 1e-6)
        assert abs(r["true_rms_255"] - 255 * delta.pow(2).mean().sqrt().item()) < 0.05
