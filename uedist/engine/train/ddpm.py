"""DDPM training and fine-tuning (Ho et al. 2020) on any unprotected shard set: the purifier of JCDP.

    accelerate launch launch/ddpm.py --config configs/ddpm/cifar10.yaml
    torchrun --nproc_per_node 2 launch/ddpm.py --config configs/ddpm/imagenet256.yaml \
        deepspeed=configs/deepspeed/zero2_bf16.json          # DeepSpeed ZeRO-2 (uedist.engine.train.zero)

Per step (global batch split across ranks): uint8 batch -> [-1, 1] -> random horizontal flip -> t ~ U{0..t_max−1},
ε ~ N(0, I) -> x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε -> loss ‖ε − ε_θ(x_t, t)‖² (the "simple" ε-prediction loss, Eq. 14)
-> Adam (lr 2e-4, linear warmup, gradient clipping at 1) through DDP -> EMA of the weights (decay 0.9999).
Checkpoints (model, EMA, optimizer, schedule, RNG, data position) every ``ckpt_every`` steps; a killed run resumes
exactly. ``init`` fine-tunes from another DDPM run or checkpoint (its EMA weights by default): the paper's
setting of a DDPM pretrained elsewhere and adapted to the exploiter's small unprotected set. At the end: a PNG
grid of samples drawn with the EMA weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from uedist.checkpoint import latest_checkpoint, load_state
from uedist.config import BF16, Cadence, Resumable, Seeded, location, positive, require, runtime
from uedist.data.grids import write_image_grid
from uedist.diffusion.ema import EMA
from uedist.diffusion.purify import sample
from uedist.diffusion.schedule import Schedule
from uedist.dist import get_logger
from uedist.engine.train.checkpoints import check_finite
from uedist.engine.train.loop import (
    OptimConfig,
    Prepared,
    StepsDone,
    Tracker,
    prepare_training,
    run_steps,
    train_batches,
    write_curve,
)
from uedist.engine.train.victim import ranks_in_sync
from uedist.io import atomic_write_json
from uedist.models.unet import UNETS, UNet
from uedist.ops import augment
from uedist.ops.images import to_uint8, to_unit
from uedist.precision import amp_args, use_bf16
from uedist.registry import stage

log = get_logger(__name__)


@dataclass
class DDPMData:
    train: str = "shards/cifar10_jpg/test"  # unprotected images (the paper: the unlabeled clean test split)
    batch_size: int = positive(128)  # global, split across ranks
    workers: int = runtime(2)
    shuffle_buffer: int = 2000
    flip: bool = True  # random horizontal flips (DDPM CIFAR-10)


@dataclass
class UNetSpec:
    name: str = "ddpm_cifar10"  # a builder in uedist.models.unet.UNETS: ddpm_cifar10, ddpm_256, unet
    args: Dict[str, Any] = field(default_factory=dict)  # overrides of the builder's defaults (ch, ch_mult, ...)


@dataclass
class DiffusionSpec:
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance: str = "beta"  # σ_t² of the reverse step (sample grid): "beta" (β_t, DDPM CIFAR-10) or "posterior" (β̃_t)

    def validate(self) -> None:
        require(
            self.T >= 2 and 0 < self.beta_start < self.beta_end < 1, "diffusion: T >= 2, 0 < beta_start < beta_end < 1"
        )
        require(self.variance in ("posterior", "beta"), f"diffusion.variance: posterior or beta, got {self.variance!r}")

    def schedule(self) -> Schedule:
        return Schedule.linear(self.T, self.beta_start, self.beta_end, variance=self.variance)  # type: ignore[arg-type]


@dataclass
class DDPMConfig(Cadence, BF16, Resumable, Seeded):
    """Defaults: DDPM's CIFAR-10 reference (800k steps of batch 128, Adam 2e-4, warmup 5000, clip 1, EMA 0.9999)."""

    name: str = location("ddpm")  # redeclared for its default: the run's folder is named after the stage
    # ckpt_every / log_every are redeclared for their defaults: a DDPM trains for hundreds of thousands of steps
    ckpt_every: int = runtime(5000)
    log_every: int = runtime(100, positive_=True)
    data: DDPMData = field(default_factory=DDPMData)
    unet: UNetSpec = field(default_factory=UNetSpec)
    diffusion: DiffusionSpec = field(default_factory=DiffusionSpec)
    steps: int = 800_000
    lr: float = 2e-4
    warmup_steps: int = 5000
    grad_clip: float = 1.0  # 0 = off
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1+n)/(10+n)): for short runs
    t_max: int = 0  # train on t < t_max only (0 = all T); a CPU-scale deviation for purification-only models
    init: str = ""  # fine-tune from: a DDPM run folder, a checkpoint folder, or a .pt holding {"model"|"ema"}
    init_ema: bool = True  # start from the EMA weights of ``init`` when it has them
    deepspeed: str = ""  # a DeepSpeed JSON config (ZeRO-2): run under torchrun; see train_ddpm_deepspeed
    num_samples: int = 64  # samples in the final PNG grid (0 = none)
    sample_steps: int = 0  # reverse steps for the grid (0 = all T; fewer: a strided chain)

    def validate(self) -> None:
        require(self.steps >= 0 and self.data.batch_size >= 1 and self.lr > 0, "steps >= 0, batch_size >= 1, lr > 0")
        require(0 <= self.t_max <= self.diffusion.T, f"t_max must be in [0, T], got {self.t_max}")
        require(0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}")
        require(0 <= self.sample_steps <= self.diffusion.T, "sample_steps must be in [0, T]")


def build_unet(spec: UNetSpec) -> UNet:
    return UNETS.build(spec.name, **spec.args)


def init_weights(path: str, prefer_ema: bool = True) -> Dict[str, torch.Tensor]:
    """Weights to fine-tune from (weights_only loads): a run folder (its newest checkpoint), a checkpoint folder,
    or a .pt file holding a state dict, {"model": ...} or {"ema": {"shadow": ...}}."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.is_dir():
        ck = latest_checkpoint(p) if (p / "latest").is_file() else p
        if ck is None or not (ck / "state.pt").is_file():
            raise FileNotFoundError(f"no DDPM checkpoint under {path}")
        state = load_state(ck)
    elif p.is_file():
        state = torch.load(p, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"DDPM weights not found: {path}")
    if prefer_ema and isinstance(state.get("ema"), dict):
        return state["ema"]["shadow"]
    return state.get("model", state)


def load_ddpm(path: str, device: torch.device, prefer_ema: bool = True) -> Tuple[UNet, DDPMConfig]:
    """A trained DDPM (EMA weights by default) rebuilt from the config its checkpoint carries; eval mode. A folder
    in the diffusers ``UNet2DModel`` layout (config.json + diffusion_pytorch_model.safetensors / .bin: how Ho et
    al.'s CIFAR-10 model is published) loads into our UNet (:mod:`uedist.diffusion.diffusers_io`)."""
    from uedist.config import config_from_dict
    from uedist.diffusion import diffusers_io

    p = Path(path)
    if diffusers_io.is_unet2d_folder(p):
        net, kw = diffusers_io.load_unet2d(p)
        spec = diffusers_io.scheduler_spec(p)
        cfg = DDPMConfig(unet=UNetSpec("unet", args=kw), diffusion=DiffusionSpec(**spec))
        return net.to(device).eval(), cfg
    ck = latest_checkpoint(p / "checkpoints" if (p / "checkpoints").is_dir() else p)
    if ck is None:
        raise FileNotFoundError(f"no DDPM checkpoint under {path} (train one with launch/ddpm.py)")
    cfg = config_from_dict(DDPMConfig, load_state(ck)["config"])
    net = build_unet(cfg.unet)
    net.load_state_dict(init_weights(str(ck), prefer_ema))
    return net.to(device).eval(), cfg


def ddpm_batch_loss(
    net: torch.nn.Module,
    s: Schedule,
    x_u8: torch.Tensor,
    *,
    t_max: int,
    flip: bool,
    gen: torch.Generator,
    amp: Dict[str, Any],
) -> torch.Tensor:
    """The simple ε-prediction loss (DDPM Eq. 14) of one uint8 batch (B, 3, H, W)."""
    x0 = to_unit(x_u8) * 2 - 1
    if flip:
        x0 = augment.random_crop_flip(x0, pad=0, gen=gen)
    t = torch.randint(0, t_max or s.T, (x0.shape[0],), generator=gen).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    with torch.autocast(**amp):
        eps = net(s.q_sample(x0, t, noise), t).float()
    return F.mse_loss(eps, noise)


def ddpm_summary(m: Dict[str, Any], run_dir: Path) -> str:
    """The end-of-job text of a DDPM training run and the next command (a purifier that uses it)."""
    return (
        f"\n{run_dir.name}: DDPM ({m['params'] / 1e6:.2f} M parameters), {m['steps']} steps; final loss "
        f"{m['final_loss']}; {m['images_per_s']:.1f} img/s on {m['world_size']} process(es)\n"
        f"wrote {run_dir / 'metrics.json'}, {run_dir / 'curve.csv'}"
        + (f", {m['samples']}" if m.get("samples") else "")
        + f", checkpoints in {run_dir / 'checkpoints'}\n"
        f"next: accelerate launch launch/purify.py --config configs/jcdp/<name>.yaml ddpm={run_dir}"
    )


@stage(
    "ddpm",
    kind="ddpm",
    schema=DDPMConfig,
    inputs=("data.train",),
    output="run",
    summary=ddpm_summary,
    smoke=(
        "unet.name=unet",
        "unet.args={ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], dropout: 0.0, image_size: 16}",
        "data.batch_size=8",
        "data.workers=0",
        "steps=4",
        "warmup_steps=1",
        "ckpt_every=2",
        "log_every=2",
        "num_samples=2",
        "sample_steps=3",
    ),
)
def train_ddpm(cfg: DDPMConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """Train or fine-tune (resumable); writes checkpoints, curve.csv, samples.png and metrics.json; returns metrics.
    Under DDP, or with ``cfg.deepspeed`` set under DeepSpeed ZeRO (:mod:`uedist.engine.train.zero`): one step loop."""
    world, device = accelerator.num_processes, accelerator.device
    torch.manual_seed(cfg.seed)
    net = build_unet(cfg.unet)
    if cfg.init:
        net.load_state_dict(init_weights(cfg.init, cfg.init_ema))
        log.info("fine-tuning from %s (%s weights)", cfg.init, "EMA" if cfg.init_ema else "raw")
    p = _prepare(cfg, net, accelerator=accelerator, run_dir=run_dir)
    ema = EMA(p.model, cfg.ema_decay, cfg.ema_warmup)
    if p.start > 0:
        ema.load_state_dict(load_state(latest_checkpoint(p.ckpt.dir))["ema"])  # type: ignore[arg-type]
    s = cfg.diffusion.schedule()
    bf16 = use_bf16(cfg.bf16, device) or bool(
        p.wrapper.startswith("DeepSpeed") and _ds_bf16(cfg)
    )  # inputs follow a bf16 module
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    seen = [0]

    def one(batch: Dict[str, torch.Tensor], step_no: int) -> Dict[str, torch.Tensor]:
        x = batch["image"].to(device, non_blocking=True)
        loss = ddpm_batch_loss(p.ddp, s, x, t_max=cfg.t_max, flip=cfg.data.flip, gen=p.gen, amp=amp)
        check_finite(loss, step_no, accelerator=accelerator, ckpt_dir=p.ckpt.dir)
        p.update(loss, clip=cfg.grad_clip)
        ema.update(p.model)
        seen[0] += x.shape[0] * world
        return {"loss": loss.detach()}

    done = run_steps(
        p,
        one,
        lambda: train_batches(cfg.data, p, total=cfg.steps, seed=cfg.seed, accelerator=accelerator),
        total=cfg.steps,
        desc=f"{cfg.name} DDPM" + (" (DeepSpeed)" if cfg.deepspeed else ""),
        log_every=cfg.log_every,
        progress=cfg.progress,
        accelerator=accelerator,
        tracker=Tracker(cfg.log_with, run_dir / "tb", accelerator),
        extra_state=lambda: {"ema": ema.state_dict()},
    )
    return _finish(cfg, accelerator, run_dir, p=p, ema=ema, s=s, done=done, seen=seen[0])


def _ds_bf16(cfg: DDPMConfig) -> bool:
    return bool(json.loads(Path(cfg.deepspeed).read_text()).get("bf16", {}).get("enabled", False))


def _prepare(cfg: DDPMConfig, net: torch.nn.Module, *, accelerator: Any, run_dir: Path) -> Prepared:
    """Adam with linear warmup then a constant LR, resumed, under DDP or (``cfg.deepspeed``) DeepSpeed ZeRO."""
    optim = OptimConfig(lr=cfg.lr, schedule="constant", warmup_steps=cfg.warmup_steps, weight_decay=0.0)
    common = dict(accelerator=accelerator, ckpt_root=run_dir, seed=cfg.seed, config=cfg, ckpt_every=cfg.ckpt_every)
    if cfg.deepspeed:
        from uedist.engine.train.zero import deepspeed_config, prepare_deepspeed

        world = accelerator.num_processes
        if cfg.data.batch_size % world:
            raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by {world} processes")
        ds = deepspeed_config(cfg.deepspeed, batch_size=cfg.data.batch_size, world=world, grad_clip=cfg.grad_clip)
        return prepare_deepspeed(net, optim, cfg.steps, ds_config=ds, resume=cfg.resume, gen_name="ddpm", **common)  # type: ignore[arg-type]
    return prepare_training(
        net,
        optim,
        cfg.steps,
        resume=cfg.resume,
        gen_name="ddpm",
        make_opt=lambda params: torch.optim.Adam(params, lr=cfg.lr),
        **common,  # type: ignore[arg-type]
    )


def _finish(
    cfg: DDPMConfig, accelerator: Any, run_dir: Path, *, p: Prepared, ema: EMA, s: Schedule, done: StepsDone, seen: int
) -> Dict[str, Any]:
    """metrics.json, curve.csv and the sample grid (rank 0), after checking every rank holds the same weights."""
    in_sync = ranks_in_sync(p.model, accelerator)
    metrics = {
        "name": cfg.name,
        "steps": cfg.steps,
        "train": cfg.data.train,
        "world_size": accelerator.num_processes,
        "wrapper": p.wrapper,
        "ranks_in_sync": in_sync,
        "params": sum(q.numel() for q in p.model.parameters()),
        "train_time_s": done.train_time,
        "images_per_s": seen / done.wall if seen else float("nan"),
        "curve": p.curve,
        "final_loss": p.curve[-1]["loss"] if p.curve else None,
    }
    if accelerator.is_main_process:
        write_curve(run_dir / "curve.csv", p.curve)
        if cfg.num_samples:
            metrics["samples"] = str(sample_grid(cfg, ema, s, device=accelerator.device, out=run_dir / "samples.png"))
        atomic_write_json(run_dir / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    return metrics


def sample_grid(cfg: DDPMConfig, ema: EMA, s: Schedule, *, device: torch.device, out: Path) -> Path:
    """Draw ``num_samples`` images with the EMA weights (strided chain if ``sample_steps``) into a PNG grid."""
    net = ema.copy_to(build_unet(cfg.unet).to(device)).eval()
    if cfg.sample_steps and cfg.sample_steps < s.T:
        s = s.respaced(np.linspace(0, s.T - 1, cfg.sample_steps).round().astype(int).tolist())
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    amp = amp_args(cfg.bf16, device)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(**amp):
            return net(x, t).float()

    size = net.image_size
    x = sample(eps_fn, s, (cfg.num_samples, net.in_channels, size, size), gen=gen, device=device)
    ncol = int(np.ceil(np.sqrt(cfg.num_samples)))
    tiles = to_uint8((x + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
    return write_image_grid([tiles[j : j + ncol] for j in range(0, len(tiles), ncol)], out)
