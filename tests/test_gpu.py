"""CUDA correctness (``pytest -m gpu``; launch/bench/gpu_check.sh runs them first on a GPU machine).

Without CUDA every test here is skipped, unless ``UEDIST_GPU_TEST_DEVICE=cpu``: then the same code runs on the
CPU (the gpu_check.sh dry run, in CI), so the path is known to work before GPU time is spent on it. On CUDA the
SEM and REM steps are compared with the same step on the CPU: fixed weights, inputs and inner noise (the CPU
generators), TF32 off. Tolerance: PGD takes signed steps, so one gradient entry of opposite sign (fp32
summation order differs) moves that pixel by 2α; at least 95 % of δ's entries must agree to 1e-5 and all lie
within ±ε. Every other test checks that its step runs on the device and leaves finite weights and outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

_DEVICE = "cuda" if torch.cuda.is_available() else os.environ.get("UEDIST_GPU_TEST_DEVICE", "")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _DEVICE, reason="needs CUDA (or UEDIST_GPU_TEST_DEVICE=cpu for the dry run)"),
]


@pytest.fixture
def device() -> torch.device:
    return torch.device(_DEVICE)


@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def _noise_cfg(method: str, *extra: str):
    from uedist.config import load_config
    from uedist.engine.attacks.sem_rem import SEMConfig

    over = [f"method={method}", "surrogate.width=0.25", "noise_steps=3", "eot_samples=2", "adv_steps=2", *extra]
    return load_config(SEMConfig, None, over)


@pytest.mark.parametrize("method", ["sem", "rem"])
def test_noise_step_matches_the_cpu(method, device, no_tf32):
    from uedist.bench.fixtures import fake_manifest
    from uedist.bench.timing import autocast_args
    from uedist.engine.attacks.sem_rem import noise_for_batch
    from uedist.engine.attacks.surrogate import make_eot, surrogate_for

    cfg, m = _noise_cfg(method), fake_manifest(32, 10)
    torch.manual_seed(0)
    ref = surrogate_for(cfg, m).eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    deltas = []
    for dev in (torch.device("cpu"), device):
        model = surrogate_for(cfg, m)
        model.load_state_dict(ref.state_dict())
        model = model.to(dev).eval()
        gen = torch.Generator().manual_seed(1)
        d = noise_for_batch(
            cfg, model, x.to(dev), y=y.to(dev), eot=make_eot(cfg, m, gen), gen=gen, amp=autocast_args(dev, False)
        )
        deltas.append(d.detach().float().cpu())
    cpu, dev_d = deltas
    assert dev_d.abs().max() <= cfg.budget / 255 + 1e-6
    agree = ((cpu - dev_d).abs() <= 1e-5).float().mean().item()
    assert agree >= 0.95, f"{method}: only {agree:.3f} of δ's entries agree with the CPU"


def test_bf16_channels_last_surrogate_step(device):
    from uedist.bench.fixtures import fake_manifest
    from uedist.bench.steps import noise_steps
    from uedist.dist import make_accelerator

    cfg = _noise_cfg("sem", "bf16=true", "channels_last=true")
    steps = noise_steps(cfg, fake_manifest(32, 10), batch=4, accelerator=make_accelerator(cpu=device.type == "cpu"))
    for fn, _passes in steps.values():
        fn()


def test_map_pass_on_the_device_writes_a_verifying_set(device, tmp_path):
    from uedist.bench.fixtures import build_synthetic_set
    from uedist.data.shards import verify_shard_set
    from uedist.dist import make_accelerator
    from uedist.engine.map_pass import run_map_pass

    src = build_synthetic_set(tmp_path / "s", num_train=40, size=16, shard_size=16)
    seen = []

    def fn(x_u8, y, keys):
        seen.append(x_u8.device.type)
        return (255 - x_u8.to(torch.int16)).to(torch.uint8)  # invert: computed on the device

    acc = make_accelerator(cpu=device.type == "cpu")
    m = run_map_pass(src, tmp_path / "out", fn, accelerator=acc, stage="gpu-test", config={}, batch_size=8)
    assert m.num_samples == 40 and verify_shard_set(tmp_path / "out", decode=True).ok
    assert set(seen) == {device.type}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_ddpm_training_step(device, bf16):
    from uedist.bench.steps import unet_steps
    from uedist.bench.timing import autocast_args
    from uedist.models.unet import UNet

    net = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16).to(device)
    x = torch.rand(4, 3, 16, 16, device=device) * 2 - 1
    for fn in unet_steps(net, x, amp=autocast_args(device, bf16)).values():
        fn()
    assert _finite(net)


def test_jcdp_purification_batch(device):
    from uedist.bench.steps import eps_model
    from uedist.bench.timing import autocast_args
    from uedist.diffusion.purify import jcdp_guidance, purify
    from uedist.diffusion.schedule import Schedule
    from uedist.models.lpips import build_lpips
    from uedist.models.unet import UNet

    net = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), image_size=32).to(device).eval()
    lp = build_lpips("alex", backbone="random").to(device)
    guide = jcdp_guidance(lp, lam_mse=1.0, lam_lpips=1.0, mse_t=(11, 1000), lpips_t=(1, 10))
    x = torch.rand(2, 3, 32, 32, device=device) * 2 - 1
    gen = torch.Generator(device=device).manual_seed(0)
    s = Schedule.linear(1000).respaced(range(9, 1000, 10))
    out = purify(eps_model(net, autocast_args(device, True)), s, x, t_p=100, rounds=1, gen=gen, guide=guide)
    assert out.shape == x.shape and out.device.type == device.type and torch.isfinite(out).all()


def test_dvae_step(device):
    from uedist.bench.fixtures import fake_manifest, random_batch
    from uedist.bench.steps import dvae_steps
    from uedist.bench.timing import autocast_args
    from uedist.config import load_config
    from uedist.engine.purifiers.dvae import DVAEConfig, build_dvae

    cfg = load_config(DVAEConfig, REPO / "configs/dvae/cifar10.yaml", ["model.width=0.25"])
    model = build_dvae(cfg, fake_manifest(32, 10)).to(device)
    x, y = random_batch(4, 32, 10, device=device)
    for fn in dvae_steps(model, x, y, amp=autocast_args(device, True)).values():
        fn()
    assert _finite(model)


def test_victim_pgd_at_step(device):
    from uedist.bench.fixtures import random_batch
    from uedist.bench.steps import classifier_step
    from uedist.bench.timing import autocast_args
    from uedist.models.resnet import resnet18

    model = resnet18(num_classes=10, width=0.25).to(device).to(memory_format=torch.channels_last)
    x, y = random_batch(4, 32, 10, device=device, channels_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    classifier_step(model, x, y, opt=opt, amp=autocast_args(device, True), adv_steps=3)()
    assert _finite(model)


@pytest.mark.slow
def test_sem_job_under_accelerate_launch(device, tmp_path):
    """`accelerate launch` (1 process; NCCL on CUDA) of the main job on a tiny synthetic set, to the end."""
    from tests.conftest import build

    sets = build(tmp_path / "sets", "synthetic.num_classes=3", "synthetic.size=16", "synthetic.num_train=48")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    cmd += ["--cpu"] if device.type == "cpu" else []
    cmd += [str(REPO / "launch/sem.py"), f"run_root={tmp_path}", "name=g", f"data.train={sets / 'train'}"]
    cmd += [f"data.test={sets / 'test'}", "steps=4", "surrogate.width=0.125", "data.batch_size=16"]
    cmd += ["noise_steps=2", "eot_samples=2", "adv_steps=1", "data.workers=0", "progress=false"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "g" / "poisoned" / "manifest.json").is_file()
