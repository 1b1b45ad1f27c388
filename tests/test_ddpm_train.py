"""The real launch scripts at toy scale: DDPM training (outputs, exact resume, fine-tuning, 2-process DDP,
2-process DeepSpeed ZeRO-2 with exact resume) and JCDP / plain purification passes (invariants, SIGKILL + rerun
gives byte-identical shards)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.test_multiprocess import accelerate_launch, free_port
from tests.test_noise_resume import _kill_when
from uedist.data.manifest import load_manifest
from uedist.data.shards import read_shard, verify_shard_set

UNET = "unet.args={ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], dropout: 0.0, image_size: 16}"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def ddpm_args(sets, root, name, *extra):
    return [
        f"name={name}",
        f"run_root={root}",
        f"data.train={sets / 'test'}",
        "unet.name=unet",
        UNET,
        "data.batch_size=8",
        "data.workers=0",
        "steps=6",
        "ckpt_every=3",
        "warmup_steps=2",
        "log_every=2",
        "num_samples=4",
        "sample_steps=5",
        "progress=false",
        *extra,
    ]


def run(script, *args, timeout=300):
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV
    )


def state(run_dir, step):
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}" / "state.pt", weights_only=True)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def rewind(run_dir, step):
    """Make a finished run look killed right after checkpoint ``step`` (in place: the resolved config, which a
    resume must match, names the run's folder)."""
    for p in (run_dir / "checkpoints").glob("step-*"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    (run_dir / "checkpoints" / "latest").write_text(f"step-{step:08d}\n")
    (run_dir / "metrics.json").unlink()


@pytest.fixture(scope="module")
def ddpm_run(synth_sets, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpm")
    r = run("launch/ddpm.py", *ddpm_args(synth_sets, root, "d"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return root / "d"


@pytest.mark.slow
def test_ddpm_outputs(ddpm_run):
    m = json.loads((ddpm_run / "metrics.json").read_text())
    assert m["steps"] == 6 and m["world_size"] == 1 and m["final_loss"] > 0 and m["ranks_in_sync"]
    assert (ddpm_run / "samples.png").stat().st_size > 0 and (ddpm_run / "curve.csv").is_file()
    log = (ddpm_run / "logs" / "rank0.log").read_text()  # progress=false (batch jobs): the curve goes to the log
    assert "DDPM step 2/6: lr" in log and "DDPM step 6/6: lr" in log
    s = state(ddpm_run, 6)  # weights_only load
    assert {"model", "optimizer", "scheduler", "ema", "config", "step"} <= set(s)
    assert s["ema"]["updates"] == 6 and s["ema"]["shadow"].keys() == s["model"].keys()
    from uedist.engine.train.ddpm import load_ddpm

    net, cfg = load_ddpm(str(ddpm_run), torch.device("cpu"))
    assert cfg.unet.args["ch"] == 16 and not net.training
    assert_same_tensors(net.state_dict(), s["ema"]["shadow"])


@pytest.mark.slow
def test_ddpm_resume_equals_uninterrupted(synth_sets, tmp_path):
    args = ddpm_args(synth_sets, tmp_path, "d", "num_samples=0")
    assert run("launch/ddpm.py", *args).returncode == 0
    full = state(tmp_path / "d", 6)
    rewind(tmp_path / "d", 3)
    r = run("launch/ddpm.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    again = state(tmp_path / "d", 6)
    assert_same_tensors(full["model"], again["model"])
    assert_same_tensors(full["ema"]["shadow"], again["ema"]["shadow"])


@pytest.mark.slow
def test_finetune_starts_from_ema_weights(ddpm_run, synth_sets, tmp_path):
    r = run(
        "launch/ddpm.py",
        *ddpm_args(
            synth_sets,
            tmp_path,
            "ft",
            f"init={ddpm_run}",
            "steps=1",
            "ckpt_every=1",
            "num_samples=0",
            "lr=1e-12",
            "warmup_steps=0",
        ),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fine-tuning from" in r.stdout + r.stderr
    tuned, src = state(tmp_path / "ft", 1)["model"], state(ddpm_run, 6)["ema"]["shadow"]
    assert max((tuned[k] - src[k]).abs().max().item() for k in src) < 1e-6  # started from the EMA weights


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddpm_two_process_ddp(synth_sets, tmp_path):
    r = accelerate_launch(
        str(REPO / "launch/ddpm.py"), *ddpm_args(synth_sets, tmp_path, "ddp", "steps=3", "num_samples=0")
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["wrapper"] == "DistributedDataParallel" and m["ranks_in_sync"]


def _have_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401

        return True
    except Exception:  # noqa: BLE001  (an import that fails for any reason means: not usable here)
        return False


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(
    not _have_deepspeed(), reason="deepspeed not importable (pip install 'deepspeed==0.19.8' with DS_BUILD_OPS=0)"
)
def test_deepspeed_zero2_two_processes_resumes_exactly(synth_sets, tmp_path):
    """ZeRO-2 + bf16 under torchrun (gloo): trains, ranks agree, and a run rewound to step 3 ends identical."""
    env = {
        **ENV,
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")
        ),
    }

    def torchrun(root):
        cmd = [
            "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(REPO / "launch/ddpm.py"),
            *ddpm_args(synth_sets, root, "ds", f"deepspeed={REPO / 'configs/deepspeed/zero2_bf16.json'}"),
        ]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)

    r = torchrun(tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    m = json.loads((tmp_path / "ds" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["wrapper"] == "DeepSpeedEngine(ZeRO-2)" and m["ranks_in_sync"]
    a = state(tmp_path / "ds", 6)
    rewind(tmp_path / "ds", 3)
    r = torchrun(tmp_path)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
    b = state(tmp_path / "ds", 6)
    for key in ("master", "model"):
        assert_same_tensors(a[key], b[key])
    assert_same_tensors(a["adam"]["exp_avg_sq"], b["adam"]["exp_avg_sq"])
    assert_same_tensors(a["ema"]["shadow"], b["ema"]["shadow"])


def jcdp_args(sets, ddpm, root, name, *extra):
    return [
        f"ddpm={ddpm}",
        f"data.src={sets / 'train'}",
        f"data.clean={sets / 'train'}",
        f"run_root={root}",
        f"name={name}",
        "lpips.net=vgg",
        "lpips.backbone=random",
        "t_p=4",
        "rounds=2",
        "stride=2",
        "data.batch_size=20",
        "data.workers=0",
        "grid=8",
        "progress=false",
        *extra,
    ]


def _shards(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def jcdp_ref(synth_sets, ddpm_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("jcdp")
    r = run("launch/jcdp.py", *jcdp_args(synth_sets, ddpm_run, root, "ref"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return root / "ref"


@pytest.mark.slow
def test_jcdp_pass_outputs(jcdp_ref, synth_sets, ddpm_run, tmp_path):
    out = jcdp_ref / "purified"
    assert verify_shard_set(out).ok
    src, m = load_manifest(synth_sets / "train"), load_manifest(out)
    assert m.num_samples == src.num_samples and m.encoding == "png" and m.provenance["stage"] == "purify:jcdp"
    for a, b in zip(src.shards, m.shards):
        ka = [(s.key, s.label) for s in read_shard(synth_sets / "train", a)]
        assert ka == [(s.key, s.label) for s in read_shard(out, b)]
    met = json.loads((jcdp_ref / "metrics.json").read_text())
    assert met["guided"] and met["samples"] == src.num_samples and met["denoising_steps_per_image"] == 4
    assert 5 < met["psnr_to_poisoned"] < 60 and (jcdp_ref / "grid.png").stat().st_size > 0
    r = run("launch/jcdp.py", *jcdp_args(synth_sets, ddpm_run, jcdp_ref.parent, "ref"))
    assert r.returncode == 0 and "already complete" in r.stdout + r.stderr
    r = run("launch/jcdp.py", *jcdp_args(synth_sets, ddpm_run, tmp_path, "plain", "method=diffusion", "rounds=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_manifest(tmp_path / "plain" / "purified").provenance["stage"] == "purify:diffusion"
    assert _shards(tmp_path / "plain" / "purified") != _shards(jcdp_ref / "purified")


@pytest.mark.slow
def test_killed_jcdp_pass_resumes_to_identical_shards(jcdp_ref, synth_sets, ddpm_run, tmp_path):
    cmd = [sys.executable, str(REPO / "launch/jcdp.py"), *jcdp_args(synth_sets, ddpm_run, tmp_path, "ref")]
    progress = tmp_path / "ref" / "purified" / "_progress"
    _kill_when(cmd, lambda: progress.is_dir() and len(list(progress.glob("shard-*.json"))) >= 1)
    assert not (tmp_path / "ref" / "purified" / "manifest.json").exists()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already written" in r.stdout + r.stderr
    assert _shards(tmp_path / "ref" / "purified") == _shards(jcdp_ref / "purified")
