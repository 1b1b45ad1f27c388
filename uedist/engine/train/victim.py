"""Victim training: standard or PGD adversarial training of a registered classifier on any shard set, with the
train-time defenses users compare against, evaluated on a clean test shard set.

    accelerate launch launch/victim.py --config configs/victim/cifar10_quick.yaml

Per step (global batch split evenly across ranks): uint8 batch -> device -> [0, 1] -> ISS defense (grayscale /
JPEG / bit depth) -> augmentation (crop+flip or random-resized-crop+flip) -> UEraser (K draws per image in its
max phase) -> cutout -> PGD (adversarial training; on the unwrapped model, parameters frozen) -> mixup / cutmix ->
forward/backward through DDP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Literal, Optional

import torch
import torch.nn.functional as F

from uedist.config import Cadence, ConfigError, Precision, Resumable, Seeded, location, positive, require, runtime
from uedist.data.ffcv_io import DataFormat, TrainFeed
from uedist.data.manifest import Manifest, load_manifest
from uedist.engine.evaluate import evaluate
from uedist.engine.inner import forward_fn, inner_chunk
from uedist.engine.train.checkpoints import check_finite, sync_buffers
from uedist.engine.train.loop import (
    OptimConfig,
    Prepared,
    StepsDone,
    Tracker,
    plot_curve,
    prepare_training,
    run_steps,
    train_batches,
    write_curve,
)
from uedist.io import atomic_write_json
from uedist.models.wrappers import Normalized
from uedist.ops import augment, iss, ueraser
from uedist.ops.images import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, to_unit
from uedist.ops.pgd import pgd
from uedist.precision import amp_args, resolved, use_bf16, use_channels_last
from uedist.registry import MODELS, stage


@dataclass
class VictimData(DataFormat):  # + format: shards | ffcv, beton
    train: str = "shards/synthetic/train"
    test: str = "shards/synthetic/test"
    batch_size: int = positive(128)  # global; each of N ranks takes batch_size / N
    workers: int = runtime(2)
    shuffle_buffer: int = 2000
    eval_batch_size: int = runtime(256, positive_=True)
    augment: Literal["auto", "crop_flip", "rrc_flip", "flip", "none"] = (
        "auto"  # auto: crop_flip <= 64 px, else rrc_flip
    )
    crop_pad: int = 4
    train_size: int = 0  # rrc output size; 0 = 7/8 of the stored size (224 for 256)
    norm: Literal["auto", "cifar", "imagenet", "none"] = "auto"  # auto: cifar stats for cifar*, else imagenet


@dataclass
class ModelSpec:
    name: str = "resnet18"
    width: float = positive(1.0)
    stem: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: cifar stem for images <= 64 px

    def validate(self) -> None:
        import uedist.models  # noqa: F401  (registers every model)
        from uedist.registry import MODELS, RegistryError

        try:
            MODELS.get(self.name)
        except RegistryError as e:
            raise ConfigError(f"name: {e}") from None


@dataclass
class AdvConfig:
    """PGD adversarial training (Madry et al.); radius and step in /255 (L∞ and L2 alike)."""

    enabled: bool = False
    norm: Literal["linf", "l2"] = "linf"
    eps: float = 4.0
    steps: int = 10
    step_size: float = 0.8
    # BatchNorm mode while crafting the attack: eval as the SEM/REM reference (whose AT figures the tables quote);
    # train as Madry et al.'s original code and our earlier default
    bn_mode: Literal["train", "eval"] = "eval"

    def validate(self) -> None:
        require(self.eps >= 0 and self.steps >= 0 and self.step_size >= 0, "adv: eps, steps, step_size must be >= 0")


@dataclass
class DefenseConfig:
    """Train-time defenses (0 / false = off)."""

    cutout: int = 0  # square side in px (16 for CIFAR)
    mixup: float = 0.0  # Beta(α, α)
    cutmix: float = 0.0  # Beta(α, α)
    grayscale: bool = False  # ISS
    jpeg_quality: int = 0  # ISS: e.g. 10
    bit_depth: int = 0  # ISS: e.g. 2
    # UEraser adversarial augmentations (Qin et al. 2023, "AA"; uedist.ops.ueraser), after crop/flip, before cutout.
    # lite: one draw per image; max: during the first ueraser_max_frac of the steps, ueraser_repeats draws per image
    # and the loss is the per-image max of the cross-entropy over them, then lite. Reference (github.com/lafeat/ueraser
    # EM/QuickStart.ipynb and LSP/cifar_train.py --mode standard; the EM trainer.py of Tianyue818/Source-of-UEraser):
    # K=5, max for epochs < 50 of 200 = 0.25 (its README example: 60 of 200); LSP's --mode em is frac 1.0.
    ueraser: Literal["off", "lite", "max"] = "off"
    ueraser_repeats: int = 5  # K for max
    ueraser_max_frac: float = 0.25  # fraction of the training steps (= epochs) with the max-over-K loss

    def validate(self) -> None:
        require(not (self.mixup and self.cutmix), "defense: choose mixup or cutmix, not both")
        require(
            0 <= self.jpeg_quality <= 100 and 0 <= self.bit_depth <= 8, "defense: jpeg_quality 0..100, bit_depth 0..8"
        )
        require(self.ueraser_max_frac <= 1, "ueraser_max_frac: a fraction of the training, 0..1")
        if self.ueraser == "max":
            require(self.ueraser_repeats >= 2, "ueraser_repeats: must be >= 2 for ueraser=max (1 draw is ueraser=lite)")
            require(
                not (self.mixup or self.cutmix),
                "ueraser=max takes the max loss over the K draws of each image; mixup / cutmix mix images across "
                "the batch and are not supported with it (ueraser=lite works with them)",
            )

    def draws(self, step_no: int, total: int) -> int:
        """UEraser draws per image at 1-based step ``step_no`` of ``total``: K in the max phase, else 1."""
        return self.ueraser_repeats if self.ueraser == "max" and step_no - 1 < self.ueraser_max_frac * total else 1


@dataclass
class VictimConfig(Cadence, Precision, Resumable, Seeded):
    name: str = location("victim")  # the run lives in <run_root>/<name> (redeclared for its default)
    steps: int = 0  # training steps; or set epochs
    epochs: float = 0.0  # converted to steps with the train set size and the global batch
    data: VictimData = field(default_factory=VictimData)
    model: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adv: AdvConfig = field(default_factory=AdvConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    # bf16 / channels_last are redeclared for their default, auto (null) instead of off: victim training is the
    # bulk of a study's compute, and bf16 pays where it is native
    bf16: Optional[bool] = None  # autocast to bfloat16; null = auto: on where the device runs it natively
    channels_last: Optional[bool] = None  # null = auto: on with native bf16 (uedist.precision)
    compile: bool = False  # torch.compile the model's forward (training step and PGD)
    fold_bn: bool = True  # PGD with BN in eval mode: BatchNorm folded into the convolutions (same function; ours)
    inner_batch: int = runtime(0)  # images per forward in the PGD of adversarial training (0: all / measured)
    eval_every: int = runtime(0)  # 0: evaluate at the end only
    snapshots: int = 0  # keep N model-only weight files evenly spaced through training (SEP's checkpoint ensemble)

    def validate(self) -> None:
        require((self.steps > 0) != (self.epochs > 0), "set exactly one of steps or epochs")
        require(self.data.batch_size > 0, "data.batch_size must be > 0")
        require(self.inner_batch >= 0, f"inner_batch must be >= 0 (0 = the device's default), got {self.inner_batch}")

    def total_steps(self, num_train: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * num_train / self.data.batch_size))


def _norm_stats(cfg: VictimConfig, m: Manifest):
    kind = cfg.data.norm
    if kind == "auto":
        kind = "cifar" if m.dataset.startswith("cifar") else "imagenet"
    return {
        "cifar": (CIFAR10_MEAN, CIFAR10_STD),
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
        "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    }[kind]


def build_victim(cfg: VictimConfig, train: Manifest) -> Normalized:
    """The registered model for this data, wrapped to take [0, 1] images."""
    stem = cfg.model.stem if cfg.model.stem != "auto" else ("cifar" if max(train.image_size) <= 64 else "imagenet")
    net = MODELS.build(cfg.model.name, num_classes=train.num_classes, stem=stem, width=cfg.model.width)
    mean, std = _norm_stats(cfg, train)
    return Normalized(net, mean, std)


def _transforms(cfg: VictimConfig, m: Manifest, gen: torch.Generator):
    """(train-time transform, eval transform) on [0, 1] device batches."""
    size = max(m.image_size)
    mode = cfg.data.augment if cfg.data.augment != "auto" else ("crop_flip" if size <= 64 else "rrc_flip")
    out_size = cfg.data.train_size or (size if mode != "rrc_flip" else round(size * 7 / 8))
    d = cfg.defense

    def iss_defense(x: torch.Tensor) -> torch.Tensor:
        if d.grayscale:
            x = iss.grayscale(x)
        if d.jpeg_quality:
            x = iss.jpeg(x, d.jpeg_quality)
        if d.bit_depth:
            x = iss.bit_depth(x, d.bit_depth)
        return x

    def train_tf(x: torch.Tensor, draws: int = 1) -> torch.Tensor:
        """(B, C, H, W) -> (draws * B, C, H, W): with UEraser, ``draws`` augmented copies, draw-major."""
        x = iss_defense(x)
        if mode == "crop_flip":
            x = augment.random_crop_flip(x, pad=cfg.data.crop_pad, gen=gen)
        elif mode == "rrc_flip":
            x = augment.random_resized_crop_flip(x, out_size, gen=gen)
        elif mode == "flip":
            x = augment.random_crop_flip(x, pad=0, gen=gen)
        if d.ueraser != "off":  # crop/flip once per image (the reference's loader), UEraser per draw
            x = ueraser.ueraser_augment(x.repeat(draws, 1, 1, 1) if draws > 1 else x, gen=gen)
        if d.cutout:
            x = augment.cutout(x, length=d.cutout, gen=gen)
        return x

    def eval_tf(x: torch.Tensor) -> torch.Tensor:
        x = iss_defense(x)  # the defense is part of the victim's pipeline at test time too
        return augment.center_crop(x, out_size) if out_size != size else x

    return train_tf, eval_tf


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def victim_summary(m: Dict[str, Any], run_dir: Path) -> str:
    """The end-of-job text of a victim run: clean test accuracy, length, speed, what was written."""
    return (
        f"\n{run_dir.name}: clean test top-1 {m['test_top1']:.2f}%  top-5 {m['test_top5']:.2f}%  "
        f"({m['test_samples']} test images; {m['steps']} steps = {m['epochs']:.1f} epochs; "
        f"{m['images_per_s']:.0f} img/s; {m['train_time_s']:.0f} s training on {m['world_size']} process(es))\n"
        f"wrote {run_dir}/: metrics.json, curve.csv, curve.png (loss and accuracy against step), checkpoints/"
    )


@stage(
    "victim",
    kind="victim",
    schema=VictimConfig,
    inputs=("data.train", "data.test"),
    summary=victim_summary,
    smoke=(
        "epochs=0",
        "steps=4",
        "model.width=0.125",
        "data.batch_size=32",
        "data.workers=0",
        "log_every=2",
        "ckpt_every=2",
    ),
)
def train_victim(cfg: VictimConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """Train and evaluate one victim; writes checkpoints, curves and metrics.json under ``run_dir``."""
    train_m, test_m = load_manifest(cfg.data.train), load_manifest(cfg.data.test)
    train_m.check_compatible(test_m, what=f"train set {cfg.data.train} vs test set {cfg.data.test}: ")
    world, device = accelerator.num_processes, accelerator.device
    total = cfg.total_steps(train_m.num_samples)
    feed = TrainFeed(cfg.data, num_samples=train_m.num_samples, seed=cfg.seed, accelerator=accelerator)  # ffcv: checked
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    p = prepare_training(
        build_victim(cfg, train_m),
        cfg.optim,
        total,
        accelerator=accelerator,
        ckpt_root=run_dir,
        seed=cfg.seed,
        config=cfg,
        ckpt_every=feed.ckpt_every(cfg.ckpt_every),
        resume=cfg.resume,
        channels_last=use_channels_last(cfg.channels_last, accelerator.device),
    )
    train_tf, eval_tf = _transforms(cfg, train_m, p.gen)
    step_fn = _make_step(cfg, p, num_classes=train_m.num_classes)
    seen = [0]

    def one(batch: Dict[str, torch.Tensor], step_no: int) -> Dict[str, float]:
        draws = cfg.defense.draws(step_no, total)
        x = train_tf(to_unit(batch["image"].to(device, non_blocking=True)), draws)  # (draws*B/N, C, H, W) in [0, 1]
        y = batch["label"].to(device, non_blocking=True)
        loss, acc = step_fn(x, y, step_no, draws=draws)
        seen[0] += y.shape[0] * world
        return {"train_loss": loss, "train_acc": 100.0 * acc}  # 0-d tensors, read when the loop logs

    snap_at = snapshot_steps(total, cfg.snapshots)

    def evaluate_due(step: int) -> Optional[Dict[str, float]]:
        if step in snap_at:
            save_snapshot(p, run_dir=run_dir, step=step)
        if not (cfg.eval_every and step % cfg.eval_every == 0 and step != total):
            return None
        sync_buffers(p.model, accelerator)
        return {"test_top1": _eval(cfg, p.model, accelerator=accelerator, eval_tf=eval_tf)["top1"]}

    tracker = Tracker(cfg.log_with, run_dir / "tb", accelerator)
    done = run_steps(
        p,
        one,
        feed.batches(p, total, shards=train_batches),  # the shard stream, or FFCV's (data.format)
        total=total,
        desc=cfg.name,
        log_every=cfg.log_every,
        progress=cfg.progress,
        accelerator=accelerator,
        tracker=tracker,
        on_step=evaluate_due,
    )
    m = _finish(cfg, p, run_dir=run_dir, done=done, seen=seen[0], num_train=train_m.num_samples, eval_tf=eval_tf)
    tracker.log({"test_top1": m["test_top1"], "test_top5": m["test_top5"]}, done.step)  # the final evaluation too
    tracker.close()
    return m


def snapshot_steps(total: int, n: int) -> set:
    """The steps of ``n`` snapshots evenly spaced through ``total`` steps, the last at ``total``."""
    return {max(1, round(total * (i + 1) / n)) for i in range(n)} if n > 0 else set()


def save_snapshot(p: Prepared, *, run_dir: Path, step: int) -> None:
    """Rank 0 writes the unwrapped model's weights as ``snapshots/step_<step>.pt`` (atomically; no collective)."""
    if p.accelerator.is_main_process:
        from uedist.checkpoint import save_weights

        save_weights({"model": p.model.state_dict(), "step": step}, run_dir / "snapshots" / f"step_{step:08d}.pt")


def list_snapshots(run_dir: Path) -> list:
    """The snapshot files of a victim run, in step order."""
    return sorted((run_dir / "snapshots").glob("step_*.pt"))


def _finish(
    cfg: VictimConfig, p: Prepared, *, run_dir: Path, done: StepsDone, seen: int, num_train: int, eval_tf: Callable
) -> Dict[str, Any]:
    """Final evaluation (all ranks in sync, every test sample counted) and metrics.json, curve.csv, curve.png."""
    accelerator, model, curve = p.accelerator, p.model, p.curve
    ips = seen / max(done.wall, 1e-9) if seen else float("nan")
    sync_buffers(model, accelerator)
    in_sync = ranks_in_sync(model, accelerator)
    ev = _eval(cfg, model, accelerator=accelerator, eval_tf=eval_tf)
    if ev["samples"] != ev["expected_samples"]:
        raise RuntimeError(f"evaluated {ev['samples']} test samples, the test set has {ev['expected_samples']}")
    metrics = {
        "name": cfg.name,
        "steps": done.step,
        "epochs": done.step * cfg.data.batch_size / num_train,
        "test_top1": ev["top1"],
        "test_top5": ev["top5"],
        "per_class_top1": ev["per_class"],
        "test_samples": ev["samples"],
        "train": cfg.data.train,
        "test": cfg.data.test,
        "model": cfg.model.name,
        "adversarial": cfg.adv.enabled,
        "world_size": accelerator.num_processes,
        "wrapper": p.wrapper,
        "precision": resolved(cfg, accelerator.device),
        "ranks_in_sync": in_sync,
        "images_per_s": ips,
        "train_time_s": done.train_time,
        "curve": curve,
        "final_train_loss": curve[-1]["train_loss"] if curve else None,
    }
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "metrics.json", metrics)
        write_curve(run_dir / "curve.csv", curve)
        panels = {"train loss": ["train_loss"], "accuracy (%)": ["train_acc", "test_top1"]}
        plot_curve(run_dir / "curve.png", [*curve, {"step": done.step, "test_top1": ev["top1"]}], panels)
    accelerator.wait_for_everyone()
    return metrics


def ranks_in_sync(model: torch.nn.Module, accelerator: Any) -> bool:
    """True if every rank holds bit-identical parameters and buffers (a float64 checksum per rank, gathered)."""
    with torch.no_grad():
        sums = torch.stack([t.detach().double().sum() for t in model.state_dict().values() if t.is_floating_point()])
        sig = torch.stack(
            [sums.sum(), (sums * torch.arange(1, len(sums) + 1, dtype=torch.float64, device=sums.device)).sum()]
        )
    gathered = accelerator.gather(sig[None].to(accelerator.device))
    return bool((gathered == gathered[0]).all())


def _eval(cfg: VictimConfig, model: torch.nn.Module, *, accelerator: Any, eval_tf: Callable) -> Dict[str, Any]:
    return evaluate(
        model,
        Path(cfg.data.test),
        accelerator=accelerator,
        batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.workers,
        transform=eval_tf,
        bf16=use_bf16(cfg.bf16, accelerator.device),
        channels_last=use_channels_last(cfg.channels_last, accelerator.device),
    )


def _make_step(cfg: VictimConfig, prepared: Prepared, *, num_classes: int) -> Callable[..., Any]:
    """One training update on a [0, 1] batch; returns (loss tensor, accuracy fraction)."""
    a, d = cfg.adv, cfg.defense
    model, ddp_model, gen, accelerator = prepared.model, prepared.ddp, prepared.gen, prepared.accelerator
    attack_gen = prepared.device_gen or gen  # PGD starts drawn on the device
    device = accelerator.device
    amp = amp_args(cfg.bf16, device)
    cl = use_channels_last(cfg.channels_last, device)
    attack_forward = forward_fn(cfg, model, amp)
    train_forward = forward_fn(cfg, ddp_model, amp)

    def step(x: torch.Tensor, y: torch.Tensor, step_no: int, *, draws: int = 1):
        """``x``: (draws * B, C, H, W), the UEraser draws of each image, draw-major; ``y``: (B,)."""
        yk = y.repeat(draws) if draws > 1 else y  # (draws * B,) labels of the rows of x
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        if a.enabled and a.steps > 0:
            was = model.training
            model.train(a.bn_mode == "train")
            for p in model.parameters():
                p.requires_grad_(False)
            # BN in train mode couples a batch's images: chunking would change δ, so only eval-mode PGD is chunked
            chunk = inner_chunk(cfg, x, n=x.shape[0], bf16=amp["enabled"])
            eps, alpha = a.eps / 255, a.step_size / 255
            fwd = forward_fn(cfg, model, amp, fold=True) if a.bn_mode == "eval" else attack_forward
            x = x + pgd(
                fwd,
                x,
                yk,
                eps=eps,
                alpha=alpha,
                steps=a.steps,
                norm=a.norm,
                gen=attack_gen,
                chunk=chunk if a.bn_mode == "eval" else 0,
            )
            for p in model.parameters():
                p.requires_grad_(True)
            model.train(was)
        target: Optional[torch.Tensor] = None
        if d.mixup or d.cutmix:
            onehot = F.one_hot(y, num_classes).float()
            x, target = (augment.mixup if d.mixup else augment.cutmix)(x, onehot, alpha=d.mixup or d.cutmix, gen=gen)
        logits = train_forward(x)
        if target is not None:
            loss = _soft_ce(logits, target)
        elif draws > 1:  # UEraser-Max: per-image max of the cross-entropy over its draws, then the mean
            loss = ueraser.repeat_loss(logits, y, draws)
        else:
            loss = F.cross_entropy(logits, y)
        check_finite(loss, step_no, accelerator=accelerator, ckpt_dir=prepared.ckpt.dir)  # before any update
        prepared.update(loss)
        acc = (logits.argmax(1) == yk).float().mean()  # over all draws; no host sync here
        return loss.detach(), acc

    return step
