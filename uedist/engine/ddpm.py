"""DDPM training and fine-tuning (Ho et al. 2020) on any unprotected shard set: the purifier of JCDP.

    accelerate launch launch/ddpm.py --config configs/ddpm/cifar10.yaml
    torchrun --nproc_per_node 2 launch/ddpm.py --config configs/ddpm/imagenet256.yaml \
        deepspeed=configs/deepspeed/zero2_bf16.json          # DeepSpeed ZeRO-2: train_ddpm_deepspeed

Per step (global batch split across ranks): uint8 batch -> [-1, 1] -> random horizontal flip -> t ~ U{0..t_max−1},
ε ~ N(0, I) -> x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε -> loss ‖ε − ε_θ(x_t, t)‖² (the "simple" ε-prediction loss, Eq. 14)
-> Adam (lr 2e-4, linear warmup, gradient clipping at 1) through DDP -> EMA of the weights (decay 0.9999).
Checkpoints (model, EMA, optimizer, schedule, RNG, data position) every ``ckpt_every`` steps; a killed run resumes
exactly. ``init`` fine-tunes from another DDPM run or checkpoint (its EMA weights by default): the paper's
setting of a DDPM pretrained elsewhere and adapted to the exploiter's small unprotected set. At the end: a PNG
grid of samples drawn with the EMA weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from uedist.checkpoint import latest_checkpoint, load_state
from uedist.config import location, require, runtime
from uedist.data.grids import write_image_grid
from uedist.data.loaders import make_train_loader
from uedist.diffusion.ema import EMA
from uedist.diffusion.purify import sample
from uedist.diffusion.schedule import Schedule
from uedist.dist import get_logger
from uedist.engine.loop import (
    Checkpointer,
    OptimConfig,
    check_finite,
    config_state,
    make_scheduler,
    prepare_training,
    progress_bar,
    report_row,
    save_training,
    write_curve,
)
from uedist.engine.victim import ranks_in_sync
from uedist.io import atomic_write_json
from uedist.models.unet import UNETS, UNet
from uedist.ops import augment
from uedist.ops.images import to_uint8, to_unit
from uedist.registry import stage

log = get_logger(__name__)


@dataclass
class DDPMData:
    train: str = "shards/cifar10_jpg/test"  # unprotected images (the paper: the unlabeled clean test split)
    batch_size: int = 128  # global, split across ranks
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
class DDPMConfig:
    """Defaults: DDPM's CIFAR-10 reference (800k steps of batch 128, Adam 2e-4, warmup 5000, clip 1, EMA 0.9999)."""

    name: str = location("ddpm")
    run_root: str = location("runs")
    seed: int = 0
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
    bf16: bool = False
    num_samples: int = 64  # samples in the final PNG grid (0 = none)
    sample_steps: int = 0  # reverse steps for the grid (0 = all T; fewer: a strided chain)
    ckpt_every: int = runtime(5000)
    log_every: int = runtime(100)
    resume: bool = runtime(True)
    progress: bool = runtime(True)

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
    """A trained DDPM (EMA weights by default) rebuilt from the config its checkpoint carries; eval mode."""
    from uedist.config import config_from_dict

    p = Path(path)
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


@stage("ddpm", kind="ddpm", schema=DDPMConfig, inputs=("data.train",), output="run", summary=ddpm_summary)
def train_ddpm(cfg: DDPMConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """Train or fine-tune (resumable); writes checkpoints, curve.csv, samples.png and metrics.json; returns metrics.
    With ``cfg.deepspeed`` set, the DeepSpeed path (``train_ddpm_deepspeed``) runs instead of DDP."""
    if cfg.deepspeed:
        return train_ddpm_deepspeed(cfg, accelerator, run_dir)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if cfg.data.batch_size % world:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by {world} processes")
    torch.manual_seed(cfg.seed)
    net = build_unet(cfg.unet)
    if cfg.init:
        net.load_state_dict(init_weights(cfg.init, cfg.init_ema))
        log.info("fine-tuning from %s (%s weights)", cfg.init, "EMA" if cfg.init_ema else "raw")
    optim = OptimConfig(lr=cfg.lr, schedule="constant", warmup_steps=cfg.warmup_steps, weight_decay=0.0)
    p = prepare_training(
        net,
        optim,
        cfg.steps,
        accelerator=accelerator,
        ckpt_root=run_dir,
        seed=cfg.seed,
        config=cfg,
        ckpt_every=cfg.ckpt_every,
        resume=cfg.resume,
        gen_name="ddpm",
        make_opt=lambda params: torch.optim.Adam(params, lr=cfg.lr),
    )
    ema = EMA(p.model, cfg.ema_decay, cfg.ema_warmup)
    if p.start > 0:
        ema.load_state_dict(load_state(latest_checkpoint(p.ckpt.dir))["ema"])  # type: ignore[arg-type]
    s = cfg.diffusion.schedule()
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    step, window, seen, t0 = p.start, [], 0, time.time()
    bar = progress_bar(cfg.steps, p.start, cfg.name, cfg.progress and accelerator.is_main_process)
    if p.start < cfg.steps:
        loader = make_train_loader(
            cfg.data.train,
            batch_size=cfg.data.batch_size // world,
            num_steps=cfg.steps,
            seed=cfg.seed,
            rank=rank,
            world_size=world,
            num_workers=cfg.data.workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            start_step=p.start,
            pin_memory=device.type == "cuda",
        )
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            loss = ddpm_batch_loss(p.ddp, s, x, t_max=cfg.t_max, flip=cfg.data.flip, gen=p.gen, amp=amp)
            check_finite(loss, step + 1, accelerator, p.ckpt.dir)
            p.opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(p.ddp.parameters(), cfg.grad_clip)
            p.opt.step()
            p.sched.step()
            ema.update(p.model)
            step += 1
            seen += x.shape[0] * world
            window.append(loss.item())
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                p.curve.append({"step": step, "lr": p.sched.get_last_lr()[0], "loss": float(np.mean(window))})
                report_row(
                    bar, p.curve[-1], cfg.steps, desc="DDPM", log_lines=not cfg.progress and accelerator.is_main_process
                )
                window = []
            if p.ckpt.due(step, cfg.steps):
                save_training(p, step, p.elapsed + time.time() - t0, ema=ema.state_dict())
    bar.close()
    return _finish(
        cfg,
        accelerator,
        run_dir,
        p.model,
        ema,
        s,
        p.curve,
        p.elapsed,
        time.time() - t0,
        seen,
        wrapper=type(p.ddp).__name__,
    )


def _finish(
    cfg: DDPMConfig,
    accelerator: Any,
    run_dir: Path,
    model: torch.nn.Module,
    ema: EMA,
    s: Schedule,
    curve: List[Dict[str, Any]],
    before: float,
    dt: float,
    seen: int,
    wrapper: str,
) -> Dict[str, Any]:
    """metrics.json, curve.csv and the sample grid (rank 0), after checking every rank holds the same weights."""
    in_sync = ranks_in_sync(model, accelerator)
    metrics = {
        "name": cfg.name,
        "steps": cfg.steps,
        "train": cfg.data.train,
        "world_size": accelerator.num_processes,
        "wrapper": wrapper,
        "ranks_in_sync": in_sync,
        "params": sum(q.numel() for q in model.parameters()),
        "train_time_s": before + dt,
        "images_per_s": seen / dt if seen else float("nan"),
        "curve": curve,
        "final_loss": curve[-1]["loss"] if curve else None,
    }
    if accelerator.is_main_process:
        write_curve(run_dir / "curve.csv", curve)
        if cfg.num_samples:
            metrics["samples"] = str(sample_grid(cfg, ema, s, accelerator.device, run_dir / "samples.png"))
        atomic_write_json(run_dir / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    return metrics


def train_ddpm_deepspeed(cfg: DDPMConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """The same training with DeepSpeed ZeRO (stage and bf16 from the JSON ``cfg.deepspeed``) instead of DDP.

    Run under ``torchrun`` (or any launcher that sets RANK / WORLD_SIZE): the Accelerator then owns the process
    group (gloo on CPU, NCCL on GPUs) and ``deepspeed.initialize`` reuses it (Accelerate's DeepSpeed plugin does
    not work on CPU; ../shared/ENVIRONMENT.md). The optimizer is torch Adam handed to DeepSpeed (no compiled ops).
    Checkpoints are ours, world-size independent and weights_only-loadable: the full fp32 master weights and
    Adam moments gathered from the ZeRO partitions (``safe_get_full_*``), EMA, schedule, RNG, step; on resume
    they are scattered back (``safe_set_full_*``). The EMA follows the module weights (bf16 under bf16)."""
    import json

    import deepspeed
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if cfg.data.batch_size % world:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by {world} processes")
    ds = json.loads(Path(cfg.deepspeed).read_text())
    ds.update(
        train_batch_size=cfg.data.batch_size,
        train_micro_batch_size_per_gpu=cfg.data.batch_size // world,
        gradient_accumulation_steps=1,
        gradient_clipping=cfg.grad_clip,
    )
    torch.manual_seed(cfg.seed)
    net = build_unet(cfg.unet)
    if cfg.init:
        net.load_state_dict(init_weights(cfg.init, cfg.init_ema))
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    ckpt = Checkpointer(run_dir, accelerator, every=cfg.ckpt_every, gens={"ddpm": gen})
    last = latest_checkpoint(ckpt.dir) if cfg.resume else None
    state = load_state(last) if last is not None else None
    if state is not None:
        net.load_state_dict(state["model"])  # the module's (bf16) copy; the fp32 master is restored below
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = make_scheduler(
        opt, OptimConfig(lr=cfg.lr, schedule="constant", warmup_steps=cfg.warmup_steps), max(cfg.steps, 1)
    )
    engine, opt, _, sched = deepspeed.initialize(model=net.to(device), optimizer=opt, lr_scheduler=sched, config=ds)
    ema = EMA(engine.module, cfg.ema_decay, cfg.ema_warmup)
    named = list(engine.module.named_parameters())
    start, curve, before = 0, [], 0.0
    if state is not None:
        from uedist.checkpoint import restore_rng

        _init_zero_adam_state(engine.optimizer, state["adam"]["step"])
        for name, prm in named:
            safe_set_full_fp32_param(prm, state["master"][name].to(device))
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(prm, state["adam"][key][name].to(device), key)
        sched.load_state_dict(state["scheduler"])
        for g, lr in zip(engine.optimizer.param_groups, sched.get_last_lr()):
            g["lr"] = lr  # the optimizer's lr is otherwise the schedule's value at step 0 until the next step
        ema.load_state_dict(state["ema"])
        restore_rng(last, rank, ckpt.gens)
        start, curve, before = state["step"], list(state["curve"]), float(state["elapsed"])
        log.info("resumed from %s (step %d)", last, start)

    def save(step: int, elapsed: float) -> None:  # collective: every rank gathers the partitions
        master = {n: safe_get_full_fp32_param(q).cpu() for n, q in named}
        adam = {k: {n: safe_get_full_optimizer_state(q, k).cpu() for n, q in named} for k in ("exp_avg", "exp_avg_sq")}
        steps = [st["step"] for st in engine.optimizer.optimizer.state.values()]
        adam["step"] = torch.as_tensor(steps[0]).clone() if steps else torch.tensor(0.0)
        ckpt.save(
            step,
            {
                "model": {k: v.float() for k, v in engine.module.state_dict().items()},
                "master": master,
                "adam": adam,
                "scheduler": sched.state_dict(),
                "ema": ema.state_dict(),
                "curve": curve,
                "elapsed": elapsed,
                **config_state(cfg),
            },
        )

    s = cfg.diffusion.schedule()
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    step, window, seen, t0 = start, [], 0, time.time()
    bar = progress_bar(cfg.steps, start, f"{cfg.name} (DeepSpeed)", cfg.progress and accelerator.is_main_process)
    if start < cfg.steps:
        loader = make_train_loader(
            cfg.data.train,
            batch_size=cfg.data.batch_size // world,
            num_steps=cfg.steps,
            seed=cfg.seed,
            rank=rank,
            world_size=world,
            num_workers=cfg.data.workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            start_step=start,
        )
        amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)  # inputs follow the bf16 module
        for batch in loader:
            loss = ddpm_batch_loss(
                engine, s, batch["image"].to(device), t_max=cfg.t_max, flip=cfg.data.flip, gen=gen, amp=amp
            )
            check_finite(loss, step + 1, accelerator, ckpt.dir)
            engine.backward(loss)
            engine.step()  # also steps the LR schedule
            ema.update(engine.module)
            step += 1
            seen += batch["image"].shape[0] * world
            window.append(loss.item())
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                curve.append({"step": step, "lr": sched.get_last_lr()[0], "loss": float(np.mean(window))})
                report_row(
                    bar,
                    curve[-1],
                    cfg.steps,
                    desc="DDPM (DeepSpeed)",
                    log_lines=not cfg.progress and accelerator.is_main_process,
                )
                window = []
            if ckpt.due(step, cfg.steps):
                save(step, before + time.time() - t0)
    bar.close()
    return _finish(
        cfg,
        accelerator,
        run_dir,
        engine.module,
        ema,
        s,
        curve,
        before,
        time.time() - t0,
        seen,
        wrapper=f"DeepSpeedEngine(ZeRO-{engine.zero_optimization_stage()})",
    )


def sample_grid(cfg: DDPMConfig, ema: EMA, s: Schedule, device: torch.device, out: Path) -> Path:
    """Draw ``num_samples`` images with the EMA weights (strided chain if ``sample_steps``) into a PNG grid."""
    net = ema.copy_to(build_unet(cfg.unet).to(device)).eval()
    if cfg.sample_steps and cfg.sample_steps < s.T:
        s = s.respaced(np.linspace(0, s.T - 1, cfg.sample_steps).round().astype(int).tolist())
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(**amp):
            return net(x, t).float()

    size = net.image_size
    x = sample(eps_fn, s, (cfg.num_samples, net.in_channels, size, size), gen=gen, device=device)
    ncol = int(np.ceil(np.sqrt(cfg.num_samples)))
    tiles = to_uint8((x + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
    return write_image_grid([tiles[j : j + ncol] for j in range(0, len(tiles), ncol)], out)


def _init_zero_adam_state(zero_opt: Any, step: torch.Tensor) -> None:
    """Create Adam's state on ZeRO-1/2's flat fp32 partitions before the first step (torch Adam creates it lazily,
    DeepSpeed links it to the parameters after the first step), so a resumed run can scatter saved moments into
    it. Touches ZeRO-1/2 internals (``single_partition_of_fp32_groups``, ``_lazy_init_hp_params_optimizer_state``)."""
    for flat in zero_opt.single_partition_of_fp32_groups:
        zero_opt.optimizer.state[flat] = {
            "step": step.clone().float(),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    zero_opt._lazy_init_hp_params_optimizer_state()
