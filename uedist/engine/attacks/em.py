"""Protect: EM — error-minimizing noise (Huang et al., ICLR 2021), sample-wise and class-wise.

Rounds, until the surrogate's error on x + δ falls below ``em.stop_error`` (or ``em.max_rounds``):

1. train the surrogate ``em.train_steps`` steps (batch ``em.batch_size``, gradient norm clipped to
   ``em.grad_clip``) on the current poisoned set;
2. sample-wise: a shard map pass over the clean set, reading the current poisoned set alongside (δ = P − x), runs
   K_u descent steps of α_u from that δ (no augmentation) and writes the next poisoned set; class-wise: one pass of
   ``em.rule`` over batches of the clean stream updates the C per-class noises (held in memory: C×3×H×W), then the
   poisoned set is written;
3. the surrogate's accuracy on the new poisoned set decides whether to stop.

Defaults are the reference code's (HanxunH/Unlearnable-Examples; docs/noise.md): the
surrogate sees x + δ in [0, 1] without normalization (``em.normalize``) and without augmentation
(``em.augment``), batch 512, clip 5; noise starts at zero (``em.start``); class-wise, per batch of a 20 % pass
(``em.subset``), one signed step per sample from its class noise, then class noise := the per-class mean,
clamped to ±ρ_u (``em.rule=reference``, ``uedist.ops.em``). No EOT in the noise steps unless ``em.augment``
(then the class-wise steps see t(x + δ) too; the sample-wise steps never do). uedist's earlier rule and settings:
``em.rule=summed em.augment=true em.normalize=true em.grad_clip=0 em.start=random em.batch_size=128``.

State lives on disk between rounds (the round's poisoned shard set, the surrogate checkpoint, the class-wise
noise tensor inside it, written atomically), so no sample-wise noise is ever held for the whole set, and a killed
job resumes at its round. Every draw is seeded (the streams by seed and round, the noise passes by key).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal

import torch
import torch.nn.functional as F

from uedist.config import identity, positive, require
from uedist.data.loaders import make_train_loader
from uedist.data.manifest import Manifest, load_manifest
from uedist.dist import get_logger
from uedist.engine.attacks.base import attack_summary, batch_gen, check_test_set, write_poisoned
from uedist.engine.attacks.surrogate import SurrogateConfig, make_eot, set_grad, surrogate_for
from uedist.engine.evaluate import evaluate
from uedist.engine.inner import inner_chunk
from uedist.engine.train.checkpoints import check_finite, sync_buffers
from uedist.engine.train.loop import (
    Prepared,
    Tracker,
    prepare_training,
    run_steps,
    save_training,
    train_batches,
    write_curve,
)
from uedist.io import atomic_write_json
from uedist.models.wrappers import Normalized
from uedist.ops.em import (
    classwise_reference_sums,
    classwise_reference_update,
    classwise_summed_grad,
    classwise_summed_update,
)
from uedist.ops.images import to_unit
from uedist.ops.noise import min_min_noise
from uedist.precision import use_bf16, use_channels_last
from uedist.registry import stage

log = get_logger(__name__)


@dataclass
class EMRounds:
    """The ``em`` section: EM rounds. Defaults: the reference code (HanxunH/Unlearnable-Examples);
    uedist's earlier rule and settings stay available: ``rule=summed augment=true normalize=true grad_clip=0
    start=random batch_size=128``."""

    mode: Literal["samplewise", "classwise"] = "samplewise"
    train_steps: int = positive(10)  # surrogate steps between noise passes (reference 10)
    stop_error: float = 0.01  # stop when the surrogate's error on x + δ is below this (reference 0.01)
    max_rounds: int = positive(50)
    # Class-wise update. reference: over a fraction `subset` of the train set in batches of `batch_size`, each
    # sample takes one signed step of noise_step_size from its class noise, then class noise := the per-class mean
    # of those results, clamped to ±eps (sums and counts all-reduced across ranks). summed (ours): noise_steps
    # signed steps of the gradient summed over a batch (and the ranks), one fresh batch each.
    rule: Literal["reference", "summed"] = "reference"
    subset: float = 0.2  # class-wise reference rule: the fraction of the train set one round's pass reads (ref. 0.2)
    batch_size: int = positive(512)  # global batch: surrogate and class-wise pass (reference 512; ours 128)
    augment: bool = False  # surrogate trains (and class-wise steps see) on t(x + δ), the EOT `augment` (ours: true)
    normalize: bool = False  # surrogate normalizes its input with the dataset mean/std (reference: [0, 1] as is)
    grad_clip: float = 5.0  # surrogate gradient-norm clip (reference 5; 0 = off, ours)
    start: Literal["zero", "random"] = "zero"  # the first noise: zero (reference) or uniform in ±eps (ours)

    def validate(self) -> None:
        require(0 < self.subset <= 1, f"subset must be in (0, 1], got {self.subset}")
        require(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        require(0 <= self.stop_error <= 1, f"stop_error must be in [0, 1], got {self.stop_error}")


@dataclass
class EMConfig(SurrogateConfig):
    """EM (Huang et al., ICLR 2021): the surrogate family's fields plus the rounds of the ``em`` section."""

    em: EMRounds = field(default_factory=EMRounds)

    def validate(self) -> None:
        super().validate()
        require(
            self.data.format == "shards",
            "data.format=ffcv is not offered for EM: its rounds train on the sets the job writes as it goes (no "
            ".beton of them exists) and its noise is indexed by key; use data.format=shards",
        )


@stage(
    "em",
    kind="attack",
    schema=EMConfig,
    inputs=("data.train", "data.test"),
    output="poisoned",
    summary=attack_summary,
    smoke=(
        "surrogate.width=0.125",
        "data.batch_size=16",
        "data.workers=0",
        "noise_steps=2",
        "final_batch_size=64",
        "em.max_rounds=1",
        "em.train_steps=3",
        "em.stop_error=0.0",
        "em.batch_size=16",
        "log_every=2",
        "ckpt_every=2",
    ),
    budget=("linf", "budget"),
)
def generate_em(cfg: EMConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """Run EM rounds to the stop criterion, write the poisoned set; returns the summary (also metrics.json).

    The surrogate trains on the one step loop (:func:`uedist.engine.train.loop.run_steps`: autocast under ``bf16``,
    NaN guard, progress, curve, optional TensorBoard), ``em.train_steps`` steps a round; the checkpoint is saved
    after each round (its poisoned set written and scored), so a killed job resumes at its last finished round."""
    m = load_manifest(cfg.data.train)
    check_test_set(cfg, m)
    require(cfg.em.train_steps >= 1, f"em.train_steps must be >= 1, got {cfg.em.train_steps}")
    torch.manual_seed(cfg.seed)
    p = prepare_training(
        em_surrogate(cfg, m),
        cfg.optim,
        cfg.em.train_steps * cfg.em.max_rounds,
        accelerator=accelerator,
        ckpt_root=run_dir / "surrogate",
        seed=cfg.seed,
        config=cfg,
        ckpt_every=0,
        resume=cfg.resume,
        channels_last=use_channels_last(cfg.channels_last, accelerator.device),
        gen_name="noise",
    )
    rnd = int(p.resumed.get("round", 0))
    classwise = p.resumed.get("classwise")
    classwise = classwise.to(accelerator.device) if classwise is not None else None
    history: List[Dict[str, Any]] = list(p.resumed.get("history", []))
    eot = em_eot(cfg, m, p.gen)
    tracker = Tracker(cfg.log_with, run_dir / "tb", accelerator)
    rounds_dir = run_dir / "em_rounds"
    current = Path(cfg.data.train) if rnd == 0 else rounds_dir / f"round-{rnd:03d}"
    t0 = time.time()
    error = history[-1]["error"] if history else 1.0
    while error >= cfg.em.stop_error and rnd < cfg.em.max_rounds:
        _train_round(cfg, p, data=current, eot=eot, rnd=rnd, tracker=tracker)
        sync_buffers(p.model, accelerator)
        if cfg.em.mode == "classwise":
            classwise = _classwise_update(cfg, p.model, m=m, noise=classwise, eot=eot, rnd=rnd, accelerator=accelerator)
        rnd += 1
        nxt = rounds_dir / f"round-{rnd:03d}"
        _write_round(cfg, p.model, current=current, nxt=nxt, classwise=classwise, accelerator=accelerator, rnd=rnd)
        top1 = evaluate(
            p.model, nxt, accelerator=accelerator, batch_size=cfg.final_batch_size, num_workers=cfg.data.workers
        )
        error = 1.0 - top1["top1"] / 100.0
        history.append({"round": rnd, "error": error, "time_s": time.time() - t0})
        tracker.log({"em_error": error}, p.start)
        log.info("EM round %d: surrogate error on x+δ %.4f (stop below %.4f)", rnd, error, cfg.em.stop_error)
        cw = classwise.cpu() if classwise is not None else None
        save_training(p, p.start, p.elapsed, round=rnd, history=history, classwise=cw)
        if accelerator.is_main_process and current != Path(cfg.data.train):
            shutil.rmtree(current, ignore_errors=True)  # keep only the newest round on disk
        current = nxt
    tracker.close()
    t_rounds = time.time() - t0
    final = _finalize(cfg, p.model, current=current, classwise=classwise, accelerator=accelerator, run_dir=run_dir)
    summary = {
        "method": "em",
        "mode": cfg.em.mode,
        "name": cfg.name,
        "train": cfg.data.train,
        "eps": cfg.budget,
        "rounds": rnd,
        "final_error": error,
        "history": history,
        "poisoned": final.pop("out"),
        "noise": final,
        "timings": {"rounds_s": t_rounds, "final_pass_s": final.pop("time_s")},
    }
    summary["noise"].pop("manifest", None)
    summary["surrogate_acc_poisoned"] = 100.0 * (1.0 - error)
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "metrics.json", summary)
        write_curve(run_dir / "surrogate_curve.csv", p.curve)
    accelerator.wait_for_everyone()
    return summary


def em_surrogate(cfg: EMConfig, m: Manifest) -> Normalized:
    """The surrogate of ``surrogate_for``; without ``em.normalize`` (the reference) its network takes the [0, 1]
    images as they are (mean 0, std 1)."""
    model = surrogate_for(cfg, m)
    if cfg.em.normalize:
        return model
    c = model.mean.shape[1]
    return Normalized(model.net, [0.0] * c, [1.0] * c)


def em_eot(cfg: EMConfig, m: Manifest, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """t: the EOT augmentation of ``cfg.augment`` with ``em.augment`` (ours), else the identity (the reference)."""
    return make_eot(cfg, m, gen) if cfg.em.augment else (lambda z: z)


def _train_round(cfg: EMConfig, p: Prepared, *, data: Path, eot: Any, rnd: int, tracker: Tracker) -> None:
    """``em.train_steps`` steps of standard training (cross-entropy on t(x + δ), t = ``eot``; batch
    ``em.batch_size``, gradient norm clipped to ``em.grad_clip``) on the round's poisoned set; global steps
    ``rnd·train_steps + 1 ..``; the round's checkpoint is saved by the caller once its noise is written."""
    acc, device = p.accelerator, p.accelerator.device
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg.bf16, device))
    end = (rnd + 1) * cfg.em.train_steps
    data_cfg = dataclasses.replace(cfg.data, batch_size=cfg.em.batch_size)

    def one(batch: Dict[str, torch.Tensor], step_no: int) -> Dict[str, Any]:
        x = eot(to_unit(batch["image"].to(device, non_blocking=True)))
        y = batch["label"].to(device, non_blocking=True)
        if use_channels_last(cfg.channels_last, device):
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(**amp):
            logits = p.ddp(x).float()
        loss = F.cross_entropy(logits, y)
        check_finite(loss, step_no, accelerator=acc, ckpt_dir=p.ckpt.dir)
        p.update(loss, clip=cfg.em.grad_clip)
        return {"loss": loss.detach(), "acc_poisoned": 100.0 * (logits.argmax(1) == y).float().mean()}

    p.model.train()
    done = run_steps(
        p,
        one,
        lambda: train_batches(
            data_cfg, p, total=cfg.em.train_steps, seed=cfg.seed * 7 + rnd, accelerator=acc, src=str(data), start=0
        ),
        total=end,
        desc=f"{cfg.name} EM round {rnd + 1} surrogate",
        log_every=cfg.log_every,
        progress=cfg.progress,
        accelerator=acc,
        tracker=tracker,
        save=lambda step, elapsed: None,
    )
    p.start, p.elapsed = done.step, done.train_time


def _delta(
    cfg: EMConfig, model: torch.nn.Module, x: torch.Tensor, *, y: torch.Tensor, start: Any, keys: List[str]
) -> torch.Tensor:
    """Sample-wise δ for x (B, C, H, W) in [0, 1]: K_u signed steps of α_u from ``start`` (the previous round's δ;
    in round 1 zero with ``em.start=zero``, else the seeded uniform start of ``min_min_noise``), no augmentation."""
    if start is None and cfg.em.start == "zero":
        start = torch.zeros_like(x)
    model.eval()
    set_grad(model, False)
    try:
        return min_min_noise(
            forward=model,
            x=x,
            y=y,
            eps=cfg.budget / 255,
            alpha=cfg.noise_step_size / 255,
            steps=cfg.noise_steps,
            eot=lambda z: z,
            samples=1,
            inner="none",
            delta=start,
            gen=batch_gen(cfg.seed, keys, device=x.device),
            chunk=inner_chunk(cfg, x, n=x.shape[0], bf16=False),
        )
    finally:
        set_grad(model, True)


def _write_round(
    cfg: EMConfig,
    model: torch.nn.Module,
    *,
    current: Path,
    nxt: Path,
    classwise: Any,
    accelerator: Any,
    rnd: int,
) -> None:
    """Sample-wise: continue every δ from the current poisoned set; class-wise: apply the class noises."""
    from uedist.engine.map_pass import run_map_pass
    from uedist.ops.noise import quantize_noise

    eps_u8 = int(cfg.budget)
    if cfg.em.mode == "classwise":

        def fn(x_u8, y, keys):
            return quantize_noise(x_u8, classwise[y], eps_u8)

        aux = None
    else:

        def fn(x_u8, y, keys, prev_u8=None):
            x = to_unit(x_u8)
            start = (prev_u8.float() - x_u8.float()) / 255 if prev_u8 is not None else None
            return quantize_noise(x_u8, _delta(cfg, model, x, y=y, start=start, keys=keys), eps_u8)

        aux = current if current != Path(cfg.data.train) else None
    run_map_pass(
        Path(cfg.data.train),
        nxt,
        fn,
        accelerator=accelerator,
        stage=f"em:round{rnd}",
        config={**identity(cfg), "round": rnd},
        batch_size=cfg.final_batch_size,
        num_workers=cfg.data.workers,
        aux=aux,
        progress=cfg.progress,
    )


def initial_classwise(cfg: EMConfig, m: Manifest, device: torch.device) -> torch.Tensor:
    """The class noises (C, 3, H, W) before round 1: zero (``em.start=zero``, the reference) or seeded uniform in
    ±ρ_u (ours)."""
    h, w = m.image_size
    if cfg.em.start == "zero":
        return torch.zeros(m.num_classes, 3, h, w, device=device)
    g = torch.Generator().manual_seed(cfg.seed)
    return ((torch.rand(m.num_classes, 3, h, w, generator=g) * 2 - 1) * cfg.budget / 255).to(device)


def classwise_batches(cfg: EMConfig, m: Manifest, *, rnd: int, accelerator: Any) -> Any:
    """This rank's batches of round ``rnd``'s class-wise pass, from the clean set's seeded stream, ``em.batch_size``
    global (split across ranks): reference ⌈subset·N / batch⌉ batches (the reference reads a fixed stratified
    20 % split, reshuffled each round; here each round draws that many samples afresh), summed K_u batches."""
    world = accelerator.num_processes
    if cfg.em.batch_size % world:
        raise ValueError(f"em.batch_size {cfg.em.batch_size} is not divisible by {world} processes")
    n = cfg.noise_steps
    if cfg.em.rule == "reference":
        n = max(1, math.ceil(cfg.em.subset * m.num_samples / cfg.em.batch_size))
    return make_train_loader(
        cfg.data.train,
        batch_size=cfg.em.batch_size // world,
        num_steps=n,
        seed=cfg.seed * 13 + rnd,
        rank=accelerator.process_index,
        world_size=world,
        num_workers=0,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )


def _classwise_update(
    cfg: EMConfig, model: torch.nn.Module, *, m: Any, noise: Any, eot: Any, rnd: int, accelerator: Any
) -> torch.Tensor:
    """One round's pass of ``em.rule`` over :func:`classwise_batches`, the surrogate frozen. reference: per batch,
    per-class sums and counts of the one-step results are all-reduced, then class noise := their mean, clamped;
    summed: one signed step per batch along the gradient summed across ranks."""
    device, eps, alpha = accelerator.device, cfg.budget / 255, cfg.noise_step_size / 255
    noise = noise if noise is not None else initial_classwise(cfg, m, device)
    model.eval()
    set_grad(model, False)
    try:
        for batch in classwise_batches(cfg, m, rnd=rnd, accelerator=accelerator):
            x, y = to_unit(batch["image"].to(device)), batch["label"].to(device)
            if cfg.em.rule == "reference":
                sums, counts = classwise_reference_sums(model, x, y, noise, eps=eps, alpha=alpha, eot=eot)
                sums = accelerator.reduce(sums, reduction="sum")
                counts = accelerator.reduce(counts, reduction="sum")
                noise = classwise_reference_update(noise, sums, counts, eps=eps)
            else:
                grad = accelerator.reduce(classwise_summed_grad(model, x, y, noise, eot=eot), reduction="sum")
                noise = classwise_summed_update(noise, grad, eps=eps, alpha=alpha)
    finally:
        set_grad(model, True)
        model.train()
    return noise.detach()


def _finalize(
    cfg: EMConfig, model: torch.nn.Module, *, current: Path, classwise: Any, accelerator: Any, run_dir: Path
) -> Dict[str, Any]:
    """Write the final poisoned set (the newest round's noise, applied to the clean set) with noise statistics."""
    if cfg.em.mode == "classwise":
        make = lambda x, y, keys: classwise[y]  # noqa: E731
        return write_poisoned(
            cfg, accelerator, run_dir, make_delta=make, stage="attack:em", extra={"mode": "classwise"}
        )
    if current == Path(cfg.data.train):
        raise RuntimeError("EM finished without a single round (max_rounds=0?)")
    # the newest round already is clip(x + δ): copy it as the result through a map pass that checks ε per pixel
    return write_poisoned(
        cfg, accelerator, run_dir, make_delta=None, stage="attack:em", extra={"mode": "samplewise"}, aux=current
    )
