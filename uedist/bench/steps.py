"""The training and inference steps the benchmarks time, each a closure ``fn()`` over fixed inputs: a classifier
update (optionally PGD adversarial training), a SEM / REM surrogate step and final-pass δ, a D-VAE train step and
inference, and the UNet / DDPM steps."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from uedist.bench.fixtures import random_batch
from uedist.bench.timing import Step
from uedist.data.manifest import Manifest
from uedist.diffusion.ema import EMA
from uedist.diffusion.schedule import Schedule
from uedist.models.dvae import dvae_loss
from uedist.ops.images import to_uint8
from uedist.ops.pgd import pgd


def _update(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: float = 0.0) -> None:
    """zero_grad, backward, clip the gradient norm of ``opt``'s parameters to ``clip`` (when > 0), step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    opt.step()


def classifier_step(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    opt: torch.optim.Optimizer,
    amp: dict[str, Any],
    adv_steps: int = 0,
) -> Step:
    """One training update of a classifier on ``x`` (B, 3, H, W) in [0, 1], labels ``y`` (B,): cross-entropy,
    backward, ``opt`` step; with ``adv_steps`` > 0, on PGD-attacked inputs (L∞ ε 4/255, α 1/255: adversarial
    training)."""

    def fwd(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(**amp):
            return model(z).float()

    def step() -> None:
        xi = x
        if adv_steps:
            model.requires_grad_(False)
            xi = x + pgd(fwd, x, y, eps=4 / 255, alpha=1 / 255, steps=adv_steps)
            model.requires_grad_(True)
        _update(opt, F.cross_entropy(fwd(xi), y))

    return step


def noise_steps(
    cfg: Any, m: Manifest, *, batch: int, accelerator: Any, structure: str = "ours"
) -> dict[str, tuple[Step, int]]:
    """``{"surrogate step": (fn, passes), "final pass": (fn, passes)}`` for a ``SEMConfig`` on a random batch at the
    manifest's size: the step is a fresh δ for the batch plus one adversarially trained SGD step of the surrogate
    (``surrogate_step``), the final pass δ alone; ``passes`` are forward+backward passes per image.
    ``structure="reference"``: the reference code's loop instead (:func:`uedist.bench.reference.
    reference_noise_delta`: J separate forwards of B per δ step, the PGD and the SGD step on B), at the config's
    precision."""
    from uedist.bench.reference import reference_noise_delta
    from uedist.engine.attacks.sem_rem import noise_for_batch, surrogate_step
    from uedist.engine.attacks.surrogate import make_eot, surrogate_for
    from uedist.precision import amp_args, use_channels_last

    device, amp = accelerator.device, amp_args(cfg.bf16, accelerator.device)
    cl = use_channels_last(cfg.channels_last, device)
    model = surrogate_for(cfg, m).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator(device=device).manual_seed(0)
    eot = make_eot(cfg, m, gen)
    x, y = random_batch(batch, m.image_size[0], m.num_classes, device=device, channels_last=cl)
    inner = cfg.adv_steps + 1 if cfg.method == "rem" else 1  # REM: a min-max, K_a attack steps inside each δ step
    final_passes = cfg.noise_steps * cfg.eot_samples * inner
    kw = {"ddp": model, "model": model, "opt": opt, "eot": eot, "gen": gen, "amp": amp, "accelerator": accelerator}
    kw.update(step=1, ckpt_dir=Path(tempfile.gettempdir()))  # where a non-finite loss would leave its report

    def delta() -> torch.Tensor:
        if structure == "reference":
            return reference_noise_delta(cfg, model, x, y, eot=eot, gen=gen, amp=amp)
        return noise_for_batch(cfg, model, x, y=y, eot=eot, gen=gen, amp=amp)

    def final() -> None:
        delta()

    def step() -> None:
        surrogate_step(cfg, x + delta(), y, **kw)

    return {"surrogate step": (step, final_passes + cfg.adv_steps + 1), "final pass": (final, final_passes)}


def dvae_steps(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, amp: dict[str, Any], grad_clip: float = 1.0
) -> dict[str, Step]:
    """``{"train step", "inference"}`` of a D-VAE on ``x`` (B, 3, H, W) in [0, 1]: forward, Eq. 14 loss (with the
    p̂ floor), backward, gradient clip, Adam; and one sampled-z forward to the purified P = x − p̂ as uint8."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train() -> None:
        with torch.autocast(**amp):
            out = model(x, y)
        loss, _ = dvae_loss(type(out)(*(t.float() for t in out)), x, kld_limit=1.0, kld_weight=0.01, p_floor=0.002)
        _update(opt, loss, grad_clip)

    @torch.no_grad()
    def infer() -> None:
        with torch.autocast(**amp):
            out = model.eval()(x, y)
        to_uint8(x - out.p.float())
        model.train()

    return {"train step": train, "inference": infer}


def unet_steps(net: torch.nn.Module, x: torch.Tensor, *, amp: dict[str, Any]) -> dict[str, Step]:
    """``{"unet_fwd", "unet_fwd_bwd", "ddpm_train"}`` of an ε-prediction UNet on x (B, 3, H, W) in [-1, 1]: one
    forward (no grad); forward + backward of the DDPM loss ‖ε − ε_θ(√ᾱ x + √(1−ᾱ) ε, t)‖² (Ho et al. Eq. 14);
    a full training step (that loss, backward, clip 1.0, Adam, EMA update)."""
    opt, ema, s = torch.optim.Adam(net.parameters(), lr=1e-4), EMA(net), Schedule.linear(1000)
    t = torch.randint(0, s.T, (x.shape[0],), device=x.device)

    def fwd() -> None:
        with torch.no_grad(), torch.autocast(**amp):
            net.eval()(x, t)
        net.train()

    def loss() -> torch.Tensor:
        noise = torch.randn_like(x)
        with torch.autocast(**amp):
            return F.mse_loss(net(s.q_sample(x, t, noise), t).float(), noise)

    def fwd_bwd() -> None:
        net.zero_grad(set_to_none=True)
        loss().backward()

    def train() -> None:
        _update(opt, loss(), 1.0)
        ema.update(net)

    return {"unet_fwd": fwd, "unet_fwd_bwd": fwd_bwd, "ddpm_train": train}


def eps_model(net: torch.nn.Module, amp: dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``eps(z, t)``: the UNet's ε prediction in float32 under ``amp``, without gradients (for ``purify``)."""

    def eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(**amp):
            return net(z, t).float()

    return eps
