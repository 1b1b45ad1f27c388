"""Protect: SEM and REM noise (stable / robust error-minimizing), on the shared surrogate machinery of
:mod:`uedist.engine.attacks.surrogate`. EM lives in :mod:`uedist.engine.attacks.em`.

    accelerate launch launch/sem.py --config configs/sem/cifar10.yaml

Phase 1 (surrogate training, M steps, DDP through the training loop, checkpointed): per step each rank takes its
batch, computes a *fresh* δ for it with ``min_min_noise`` (K_u signed steps × J batched EOT draws; SEM: uniform
δ_r of radius ρ_a, REM: PGD δ_a), then takes one SGD step of the surrogate on PGD(ρ_a, K_a, α_a)-attacked
t(x + δ). Phase 2 (final pass, surrogate frozen): a shard map pass computes δ for every sample the same way and
writes ``clip(x + δ)`` (δ quantized to 1/255, |δ| ≤ ``budget`` checked for every pixel) losslessly, keys and
labels kept (:func:`uedist.engine.attacks.base.write_poisoned`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from uedist.config import positive, require
from uedist.data.ffcv_io import TrainFeed
from uedist.data.manifest import load_manifest
from uedist.dist import get_logger
from uedist.engine.attacks.base import attack_summary, batch_gen, check_test_set, write_poisoned
from uedist.engine.attacks.surrogate import (
    SurrogateConfig,
    eot_size,
    load_surrogate,
    make_eot,
    set_grad,
    surrogate_eval,
    surrogate_for,
)
from uedist.engine.inner import forward_fn, inner_chunk
from uedist.engine.train.checkpoints import check_finite
from uedist.engine.train.loop import Tracker, prepare_training, run_steps, train_batches, write_curve
from uedist.io import atomic_write_json
from uedist.models.wrappers import Normalized
from uedist.ops.images import to_unit
from uedist.ops.noise import min_min_noise
from uedist.ops.pgd import pgd
from uedist.precision import amp_args, resolved, use_channels_last
from uedist.registry import stage

log = get_logger(__name__)


@dataclass
class SEMConfig(SurrogateConfig):
    """SEM / REM: the surrogate family's fields plus the EOT draws and the inner perturbation's radius ρ_a (SEM:
    uniform δ_r, REM: PGD δ_a), also the surrogate's adversarial-training radius."""

    eot_samples: int = positive(5)  # J
    adv_eps: float = 4.0  # ρ_a (SEM: radius of δ_r; REM: of δ_a; both: surrogate adversarial training)
    adv_steps: int = 10  # K_a
    adv_step_size: float = 0.8  # α_a

    def validate(self) -> None:
        super().validate()
        require(self.adv_eps >= 0 and self.adv_steps >= 0 and self.adv_step_size >= 0, "adv_* must be >= 0")
        require(self.method != "rem" or self.adv_steps >= 1, "rem needs adv_steps >= 1 (the inner PGD)")

    @property
    def inner(self) -> str:
        return {"sem": "uniform", "rem": "pgd"}.get(self.method, "none")


def noise_for_batch(
    cfg: SEMConfig,
    model: Normalized,
    x: torch.Tensor,
    *,
    y: torch.Tensor,
    eot: Callable[[torch.Tensor], torch.Tensor],
    gen: torch.Generator,
    amp: Dict[str, Any],
) -> torch.Tensor:
    """Fresh error-minimizing δ for x (B, C, H, W) in [0, 1], surrogate in eval mode with frozen parameters; the
    forwards run ``inner_chunk`` images at a time (δ does not depend on it)."""
    was = model.training
    model.eval()
    set_grad(model, False)
    fwd = forward_fn(cfg, model, amp, fold=True)
    try:
        n = x.shape[0] * cfg.eot_samples
        chunk = inner_chunk(cfg, x, n=n, bf16=amp["enabled"], out_hw=eot_size(cfg, x.shape[-2:]))
        return min_min_noise(
            fwd,
            x,
            y,
            eps=cfg.budget / 255,
            alpha=cfg.noise_step_size / 255,
            steps=cfg.noise_steps,
            eot=eot,
            samples=cfg.eot_samples,
            inner=cfg.inner,
            inner_eps=cfg.adv_eps / 255,
            inner_steps=cfg.adv_steps,
            inner_alpha=cfg.adv_step_size / 255,
            gen=gen,
            chunk=chunk,
        )
    finally:
        set_grad(model, True)
        model.train(was)


def train_surrogate(cfg: SEMConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """Phase 1: M steps of min-min surrogate training (resumable). Returns stats; the weights stay in run_dir."""
    m = load_manifest(cfg.data.train)
    device = accelerator.device
    feed = TrainFeed(cfg.data, num_samples=m.num_samples, seed=cfg.seed, accelerator=accelerator)  # ffcv: checked
    torch.manual_seed(cfg.seed)
    p = prepare_training(
        surrogate_for(cfg, m),
        cfg.optim,
        cfg.steps,
        accelerator=accelerator,
        ckpt_root=run_dir / "surrogate",
        seed=cfg.seed,
        config=cfg,
        ckpt_every=feed.ckpt_every(cfg.ckpt_every),
        resume=cfg.resume,
        channels_last=use_channels_last(cfg.channels_last, device),
        gen_name="noise",
    )
    gen = p.device_gen or p.gen  # the inner loops draw on the device
    eot = make_eot(cfg, m, gen)
    amp = amp_args(cfg.bf16, device)

    def one(batch: Dict[str, torch.Tensor], step_no: int) -> Dict[str, float]:
        x = to_unit(batch["image"].to(device, non_blocking=True))
        y = batch["label"].to(device, non_blocking=True)
        if use_channels_last(cfg.channels_last, device):
            x = x.contiguous(memory_format=torch.channels_last)
        delta = noise_for_batch(cfg, p.model, x, y=y, eot=eot, gen=gen, amp=amp)
        if cfg.train_on_rounded:  # the reference trains on the δ it would write: whole /255 levels
            delta = ((x + torch.round(delta * 255) / 255).clamp(0, 1) - x).detach()
        loss, acc = surrogate_step(
            cfg,
            x + delta,
            y,
            ddp=p.ddp,
            model=p.model,
            opt=p.opt,
            eot=eot,
            gen=gen,
            amp=amp,
            accelerator=accelerator,
            step=step_no,
            ckpt_dir=p.ckpt.dir,
        )
        return {"loss": loss, "acc_poisoned_adv": 100.0 * acc}

    done = run_steps(
        p,
        one,
        feed.batches(p, cfg.steps, shards=train_batches),  # the shard stream, or FFCV's (data.format)
        total=cfg.steps,
        desc=f"{cfg.name} surrogate",
        log_every=cfg.log_every,
        progress=cfg.progress,
        accelerator=accelerator,
        tracker=Tracker(cfg.log_with, run_dir / "tb", accelerator),
    )
    if accelerator.is_main_process:
        write_curve(run_dir / "surrogate_curve.csv", p.curve)
    return {"steps": cfg.steps, "time_s": done.train_time, "curve": p.curve}


def surrogate_step(
    cfg: SEMConfig,
    xp: torch.Tensor,
    y: torch.Tensor,
    *,
    ddp: torch.nn.Module,
    model: Normalized,
    opt: torch.optim.Optimizer,
    eot: Callable,
    gen: torch.Generator,
    amp: Dict[str, Any],
    accelerator: Any,
    step: int,
    ckpt_dir: Path,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of the surrogate on PGD(ρ_a, K_a, α_a)-attacked t(x + δ) (adversarial training).

    ``xp`` (B, C, H, W) in [0, 1] is the perturbed batch x + δ, ``y`` (B,) its labels; ``ddp`` is the (possibly
    DDP-wrapped) model that takes the update, ``model`` the bare one the PGD attack runs on (eval mode). Returns
    the batch's loss and accuracy on the attacked images."""
    with torch.no_grad():
        xa = eot(xp)
    if cfg.adv_steps > 0 and cfg.adv_eps > 0:
        model.eval()
        set_grad(model, False)
        fwd = forward_fn(cfg, model, amp, fold=True)
        chunk = inner_chunk(cfg, xa, n=xa.shape[0], bf16=amp["enabled"])
        eps, alpha = cfg.adv_eps / 255, cfg.adv_step_size / 255
        xa = xa + pgd(fwd, xa, y, eps=eps, alpha=alpha, steps=cfg.adv_steps, gen=gen, chunk=chunk)
        set_grad(model, True)
        model.train()
    with torch.autocast(**amp):
        logits = ddp(xa).float()
    loss = F.cross_entropy(logits, y)
    check_finite(loss, step, accelerator=accelerator, ckpt_dir=ckpt_dir)
    opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    opt.step()
    # 0-d tensors: read by the loop only when it logs (no host sync per step besides check_finite's)
    return loss.detach(), (logits.argmax(1) == y).float().mean()


_SEM_STAGE = dict(
    kind="attack",
    schema=SEMConfig,
    inputs=("data.train", "data.test"),
    output="poisoned",
    summary=attack_summary,
    smoke=(
        "surrogate.width=0.125",
        "data.batch_size=16",
        "data.workers=0",
        "steps=2",
        "noise_steps=2",
        "eot_samples=2",
        "adv_steps=1",
        "adv_step_size=2",
        "final_batch_size=64",
        "ckpt_every=2",
        "log_every=2",
    ),
    budget=("linf", "budget"),
)


@stage("sem", **_SEM_STAGE)
@stage("rem", **_SEM_STAGE)
def generate_noise(cfg: SEMConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """SEM / REM: phase 1 (surrogate) then phase 2 (final pass); writes metrics.json; returns the summary."""
    m = load_manifest(cfg.data.train)
    check_test_set(cfg, m)
    device = accelerator.device
    summary: Dict[str, Any] = {"method": cfg.method, "name": cfg.name, "train": cfg.data.train, "eps": cfg.budget}
    summary["precision"] = resolved(cfg, device)
    phase1 = train_surrogate(cfg, accelerator, run_dir)
    timings: Dict[str, float] = {"surrogate_training_s": phase1["time_s"]}
    summary["surrogate_curve"] = phase1["curve"]
    model = load_surrogate(cfg, run_dir, m=m, device=device)
    if use_channels_last(cfg.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    amp = amp_args(cfg.bf16, device)

    def make_delta(x: torch.Tensor, y: torch.Tensor, keys: List[str]) -> torch.Tensor:
        gen = batch_gen(cfg.seed, keys, device=x.device)
        if use_channels_last(cfg.channels_last, device):
            x = x.contiguous(memory_format=torch.channels_last)
        return noise_for_batch(cfg, model, x, y=y, eot=make_eot(cfg, m, gen), gen=gen, amp=amp)

    final = write_poisoned(cfg, accelerator, run_dir, make_delta=make_delta, stage=f"attack:{cfg.method}")
    timings["final_pass_s"] = final.pop("time_s")
    final.pop("manifest")
    summary.update(poisoned=final.pop("out"), noise=final, timings=timings)
    summary.update(surrogate_eval(cfg, model, poisoned=Path(summary["poisoned"]), accelerator=accelerator))
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "metrics.json", summary)
    accelerator.wait_for_everyone()
    return summary
