"""Protect: REM / SEM noise generation (and the random-noise control). EM lives in ``uedist.engine.em``.

    accelerate launch launch/sem.py --config configs/sem/cifar10.yaml

Phase 1 (surrogate training, M steps, DDP through the training loop, checkpointed): per step each rank takes its
batch, computes a *fresh* δ for it with ``min_min_noise`` (K_u signed steps × J batched EOT draws; SEM: uniform
δ_r of radius ρ_a, REM: PGD δ_a), then takes one SGD step of the surrogate on PGD(ρ_a, K_a, α_a)-attacked
t(x + δ). Phase 2 (final pass, surrogate frozen): a shard map pass computes δ for every sample the same way and
writes ``clip(x + δ)`` (δ quantized to 1/255, |δ| ≤ ε checked for every pixel) losslessly, keys and labels kept.
Nothing holds all the noise in memory: each batch's noise lives only until its shard is written.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Set, Tuple

import torch
import torch.nn.functional as F

from uedist.config import identity, location, positive, require, runtime
from uedist.data.manifest import Manifest, keys_of, load_manifest
from uedist.dist import get_logger
from uedist.engine.evaluate import evaluate
from uedist.engine.inner import forward_fn, inner_chunk
from uedist.engine.loop import (
    OptimConfig,
    Tracker,
    check_finite,
    prepare_training,
    run_steps,
    train_batches,
    write_curve,
)
from uedist.engine.map_pass import npy_bytes, pass_seconds, run_map_pass
from uedist.engine.stats import RunningSums
from uedist.engine.victim import ModelSpec
from uedist.io import atomic_write_json
from uedist.models.wrappers import Normalized
from uedist.ops import augment
from uedist.ops.budget import Budget, measure
from uedist.ops.images import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, to_unit
from uedist.ops.noise import min_min_noise
from uedist.ops.pgd import pgd
from uedist.precision import amp_args, resolved, use_bf16, use_channels_last
from uedist.registry import MODELS, stage

log = get_logger(__name__)


@dataclass
class NoiseData:
    train: str = "shards/synthetic/train"  # the clean set to protect
    test: str = ""  # optional clean test set: the surrogate's clean accuracy is reported
    build: str = ""  # shard-build YAML used to create `train` when it does not exist (the main job's synthetic set)
    batch_size: int = positive(128)  # global, split across ranks
    workers: int = runtime(2)
    shuffle_buffer: int = 2000


@dataclass
class EMConfig:
    """EM rounds (``uedist.engine.em``). Defaults: the reference code (HanxunH/Unlearnable-Examples, REFERENCE.md);
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
class NoiseConfig:
    """Settings of REFERENCE.md, in /255 units. Defaults: the CIFAR-10 SEM reference."""

    method: str = "sem"  # the stage: sem, rem, em, random (fixed by the registry; see uedist stages)
    name: str = location("sem")
    run_root: str = location("runs")
    out: str = location("")  # the poisoned shard set; default <run_root>/<name>/poisoned
    seed: int = 0
    data: NoiseData = field(default_factory=NoiseData)
    eps: float = 8.0  # ρ_u
    noise_steps: int = 10  # K_u
    noise_step_size: float = 1.6  # α_u
    eot_samples: int = positive(5)  # J
    adv_eps: float = 4.0  # ρ_a (SEM: radius of δ_r; REM: of δ_a; both: surrogate adversarial training)
    adv_steps: int = 10  # K_a
    adv_step_size: float = 0.8  # α_a
    augment: Literal["auto", "crop_flip", "rrc_flip", "none"] = "auto"  # EOT: crop+flip <= 64 px, else RRC+flip
    crop_pad: int = 4
    train_size: int = 0  # RRC output size; 0 = 7/8 of the stored size (224 for 256)
    steps: int = 5000  # M surrogate steps
    surrogate: ModelSpec = field(default_factory=lambda: ModelSpec(stem="cifar"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(schedule="step", milestones=[0.4, 0.8]))
    final_batch_size: int = positive(256)
    save_noise: bool = False  # also store the int8 noise per sample (noise.npy)
    poison_ratio: float = 1.0  # D-VAE Tables 8-9: a seeded fraction of the keys poisoned, the rest clean
    em: EMConfig = field(default_factory=EMConfig)
    random_mode: Literal["samplewise", "classwise"] = "samplewise"
    bf16: Optional[bool] = None  # null = auto: on where the device runs bf16 natively (uedist.precision)
    channels_last: Optional[bool] = None  # null = auto: on with native bf16
    compile: bool = False  # torch.compile the surrogate's forward in the noise, PGD and training loops
    fold_bn: bool = True  # inner loops: eval-mode BatchNorm folded into the convolutions (same function; ours)
    # The REM/SEM reference's surrogate sees x − 0.5 (std 1) and trains on δ rounded to /255 (REFERENCE.md); ours
    # normalizes with the dataset's mean/std and trains on the unrounded δ. Both are options; ours is the default.
    # Measured on the CIFAR-10 sample (configs/sem/cifar10_cpu.yaml, victim at the defaults, clean 70.28 %): ours
    # 25.67 %, the reference's (surrogate_input=half train_on_rounded=true) 27.86 %: one seed each (docs/noise.md).
    surrogate_input: Literal["dataset", "half"] = "dataset"
    train_on_rounded: bool = False
    inner_batch: int = runtime(0)  # images per forward in the inner loops (0: all on a GPU, measured on a CPU)
    ckpt_every: int = runtime(500)
    log_every: int = runtime(50, positive_=True)
    resume: bool = runtime(True)
    progress: bool = runtime(True)
    log_with: str = runtime("")  # "tensorboard": scalars of every curve row under <run>/tb (off by default)

    def validate(self) -> None:
        require(0 < self.eps <= 64, f"eps must be in (0, 64] (/255), got {self.eps}")
        require(self.eps == int(self.eps), f"eps must be a whole number of /255 levels, got {self.eps}")
        require(self.noise_steps >= 1 and self.noise_step_size > 0, "noise_steps >= 1 and noise_step_size > 0")
        require(self.inner_batch >= 0, f"inner_batch must be >= 0 (0 = the device's default), got {self.inner_batch}")
        require(self.adv_eps >= 0 and self.adv_steps >= 0 and self.adv_step_size >= 0, "adv_* must be >= 0")
        require(self.steps >= 0 and self.data.batch_size >= 1, "steps >= 0, data.batch_size >= 1")
        require(self.method != "rem" or self.adv_steps >= 1, "rem needs adv_steps >= 1 (the inner PGD)")
        require(0 < self.poison_ratio <= 1, f"poison_ratio must be in (0, 1], got {self.poison_ratio}")

    @property
    def inner(self) -> str:
        return {"sem": "uniform", "rem": "pgd"}.get(self.method, "none")


def surrogate_for(cfg: NoiseConfig, m: Manifest) -> Normalized:
    stem = cfg.surrogate.stem if cfg.surrogate.stem != "auto" else ("cifar" if max(m.image_size) <= 64 else "imagenet")
    net = MODELS.build(cfg.surrogate.name, num_classes=m.num_classes, stem=stem, width=cfg.surrogate.width)
    if cfg.surrogate_input == "half":  # the REM/SEM reference: x − 0.5, std 1
        return Normalized(net, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0))
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if m.dataset.startswith("cifar") else (IMAGENET_MEAN, IMAGENET_STD)
    return Normalized(net, mean, std)


def make_eot(cfg: NoiseConfig, m: Manifest, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """One random augmentation per image, batched and differentiable (crop+flip at 32 px, RRC 224 + flip at 256)."""
    size = max(m.image_size)
    mode = cfg.augment if cfg.augment != "auto" else ("crop_flip" if size <= 64 else "rrc_flip")
    out = cfg.train_size or round(size * 7 / 8)
    if mode == "crop_flip":
        return lambda z: augment.random_crop_flip(z, pad=cfg.crop_pad, gen=gen)
    if mode == "rrc_flip":
        return lambda z: augment.random_resized_crop_flip(z, out, gen=gen)
    return lambda z: z


def eot_size(cfg: NoiseConfig, hw: Any) -> Tuple[int, int]:
    """(H, W) of an EOT-augmented image of a stored (H, W): RRC's output size, else unchanged."""
    size = max(int(hw[0]), int(hw[1]))
    mode = cfg.augment if cfg.augment != "auto" else ("crop_flip" if size <= 64 else "rrc_flip")
    if mode == "rrc_flip":
        out = cfg.train_size or round(size * 7 / 8)
        return out, out
    return int(hw[0]), int(hw[1])


def _set_grad(model: torch.nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


def noise_for_batch(
    cfg: NoiseConfig,
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
    _set_grad(model, False)
    fwd = forward_fn(cfg, model, amp, fold=True)
    try:
        n = x.shape[0] * cfg.eot_samples
        chunk = inner_chunk(cfg, x, n=n, bf16=amp["enabled"], out_hw=eot_size(cfg, x.shape[-2:]))
        return min_min_noise(
            fwd,
            x,
            y,
            eps=cfg.eps / 255,
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
        _set_grad(model, True)
        model.train(was)


def train_surrogate(cfg: NoiseConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """Phase 1: M steps of min-min surrogate training (resumable). Returns stats; the weights stay in run_dir."""
    m = load_manifest(cfg.data.train)
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    p = prepare_training(
        surrogate_for(cfg, m),
        cfg.optim,
        cfg.steps,
        accelerator=accelerator,
        ckpt_root=run_dir / "surrogate",
        seed=cfg.seed,
        config=cfg,
        ckpt_every=cfg.ckpt_every,
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
        lambda: train_batches(cfg.data, p, total=cfg.steps, seed=cfg.seed, accelerator=accelerator),
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
    cfg: NoiseConfig,
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
        _set_grad(model, False)
        fwd = forward_fn(cfg, model, amp, fold=True)
        chunk = inner_chunk(cfg, xa, n=xa.shape[0], bf16=amp["enabled"])
        eps, alpha = cfg.adv_eps / 255, cfg.adv_step_size / 255
        xa = xa + pgd(fwd, xa, y, eps=eps, alpha=alpha, steps=cfg.adv_steps, gen=gen, chunk=chunk)
        _set_grad(model, True)
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


def load_surrogate(cfg: NoiseConfig, run_dir: Path, *, m: Manifest, device: torch.device) -> Normalized:
    from uedist.checkpoint import latest_checkpoint, load_state

    model = surrogate_for(cfg, m).to(device)
    path = latest_checkpoint(run_dir / "surrogate" / "checkpoints")
    if path is not None:
        model.load_state_dict(load_state(path)["model"])
    elif cfg.steps > 0:
        raise FileNotFoundError(f"no surrogate checkpoint under {run_dir / 'surrogate'}: run phase 1 first")
    return model.eval()


class NoiseStats:
    """Running statistics of the written noise, combined across ranks at the end: ℓ∞ (/255 levels), ℓ2 (the
    image's [0, 1] units, reported ×255 as ``l2_mean`` /255 for the ℓ∞ family), ℓ0 (changed pixel positions),
    and the samples over the budget."""

    def __init__(self, device: torch.device, budget: Budget) -> None:
        self.budget = budget
        self.sums = RunningSums(device, sums=("n", "l2", "l0", "violations", "poisoned"), maxima=("linf", "l2max"))

    def update(self, clean: torch.Tensor, poisoned: torch.Tensor) -> None:
        linf, l2, l0 = (measure(clean, poisoned, n) for n in ("linf", "l2", "l0"))
        size = {"linf": linf, "l2": l2, "l0": l0}[self.budget.norm]
        self.sums.add(
            n=clean.shape[0],
            l2=l2.sum() * 255.0,
            l0=l0.sum(),
            violations=self.budget.violations(size).sum(),
            poisoned=(l0 > 0).sum(),
        )
        self.sums.maximum(linf=linf.max(), l2max=l2.max())

    def result(self, accelerator: Any) -> Dict[str, float]:
        """Collective. Over the whole set, also after a resumed pass (the map pass keeps per-shard sums)."""
        r = self.sums.result(accelerator)
        n = max(r["n"], 1.0)
        return {
            "samples": int(r["n"]),
            "budget": str(self.budget),
            "linf_max": max(r["linf"], 0.0),
            "l2_mean": r["l2"] / n,
            "l2_max": max(r["l2max"], 0.0),
            "l0_mean": r["l0"] / n,
            "changed_samples": int(r["poisoned"]),
            "eps_violations": int(r["violations"]),
        }


def poison_keys(m: Manifest, *, ratio: float, seed: int) -> Optional[Set[int]]:
    """The keys a ``poison_ratio`` < 1 poisons: exactly round(ratio · N) of them, a seeded draw over the set's keys
    (None = all). When the manifest cannot list the keys (gaps it does not record), each key is kept by a seeded
    hash draw instead, which gives the fraction only on average (said in the manifest)."""
    if ratio >= 1.0:
        return None
    keys = keys_of(m)
    if keys is None:
        return None
    g = torch.Generator().manual_seed(seed * 7_919 + 104_729)
    take = torch.randperm(len(keys), generator=g)[: round(ratio * len(keys))].tolist()
    return {keys[i] for i in take}


def _hash_kept(key: int, *, ratio: float, seed: int) -> bool:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < ratio


def write_poisoned(
    cfg: Any,
    accelerator: Any,
    run_dir: Path,
    *,
    make_delta: Optional[Callable],
    stage: str,
    extra: Optional[Dict[str, Any]] = None,
    aux: Optional[Path] = None,
    budget: Optional[Budget] = None,
) -> Dict[str, Any]:
    """Phase 2: the shard map pass that writes clip(x + δ) for every sample (resumable by shard).

    ``make_delta(x, y, keys)`` gives δ in [0, 1] units; or, with ``make_delta=None`` and ``aux`` (an already
    poisoned set of the same samples), δ = aux − x is re-quantized and checked. ``budget`` (default ℓ∞ ``cfg.eps``)
    is applied to every sample and checked on what is written: a sample over it stops the job. With
    ``cfg.poison_ratio`` < 1 only a seeded subset of the keys is perturbed (δ is computed for those alone), the
    rest is copied; the manifest lists the poisoned keys. ``cfg`` is any config with the noise fields
    (``out``, ``data``, ``final_batch_size``, ``method``, ``seed``, ``save_noise``, ``progress``)."""
    out = Path(cfg.out) if cfg.out else run_dir / "poisoned"
    budget = budget or Budget("linf", float(cfg.eps))
    stats = NoiseStats(accelerator.device, budget)
    ratio = float(getattr(cfg, "poison_ratio", 1.0))
    chosen = poison_keys(load_manifest(cfg.data.train), ratio=ratio, seed=cfg.seed)

    def selected(keys: List[str]) -> torch.Tensor:
        if ratio >= 1.0:
            return torch.ones(len(keys), dtype=torch.bool)
        if chosen is not None:
            return torch.tensor([int(k) in chosen for k in keys], dtype=torch.bool)
        return torch.tensor([_hash_kept(int(k), ratio=ratio, seed=cfg.seed) for k in keys], dtype=torch.bool)

    def fn(
        x_u8: torch.Tensor, y: torch.Tensor, keys: List[str], prev_u8: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        mask = selected(keys).to(x_u8.device)
        poisoned = x_u8.clone()
        if mask.any():
            xs, idx = x_u8[mask], mask.nonzero().flatten().tolist()
            if make_delta is None:
                delta = (prev_u8[mask].float() - xs.float()) / 255  # type: ignore[index]
            else:
                delta = make_delta(to_unit(xs), y[mask], [keys[i] for i in idx])
            poisoned[mask] = budget.apply(xs, delta)
        stats.update(x_u8, poisoned)
        return poisoned

    def extras(x_u8: torch.Tensor, p: torch.Tensor) -> List[Dict[str, bytes]]:
        if not cfg.save_noise:
            return [{} for _ in range(x_u8.shape[0])]
        d = (p.to(torch.int16) - x_u8.to(torch.int16)).to(torch.int8).permute(0, 2, 3, 1).cpu().numpy()
        return [{"noise.npy": npy_bytes(a)} for a in d]

    info: Dict[str, Any] = {"method": cfg.method, "norm": budget.norm, "eps": budget.eps, **(extra or {})}
    if ratio < 1.0:
        info["poison"] = {
            "ratio": ratio,
            "seed": cfg.seed,
            "rule": "exact seeded draw" if chosen is not None else "seeded hash per key (fraction on average)",
            "keys": sorted(chosen) if chosen is not None else None,
        }
    t0 = time.time()
    m = run_map_pass(
        Path(cfg.data.train),
        out,
        fn,
        accelerator=accelerator,
        stage=stage,
        config=identity(cfg),
        batch_size=cfg.final_batch_size,
        num_workers=cfg.data.workers,
        extras_fn=extras,
        extra={"noise": info},
        progress=cfg.progress,
        aux=aux,
        stats=[stats.sums],
    )
    res = stats.result(accelerator)
    if res["eps_violations"]:
        raise RuntimeError(f"{res['eps_violations']} samples exceed the budget {budget}: refusing to trust {out}")
    spent = pass_seconds(m, accelerator, time.time() - t0)  # over every run of the pass
    return {"out": str(out), "manifest": m, "time_s": spent, **res}


def _batch_gen(seed: int, keys: List[str], device: Optional[torch.device] = None) -> torch.Generator:
    """A generator that depends only on the batch's first key: a resumed pass draws what an uninterrupted one did.
    It lives on ``device`` (the batch's), so the final pass draws there (the same numbers as today on a CPU)."""
    return torch.Generator(device=device or "cpu").manual_seed(seed * 1_000_003 + int(keys[0]))


def random_delta(cfg: NoiseConfig) -> Callable:
    """The control: uniform noise in [−ε, ε], one per sample (seeded by key) or one per class (seeded by class)."""

    def make(x: torch.Tensor, y: torch.Tensor, keys: List[str]) -> torch.Tensor:
        seeds = y.tolist() if cfg.random_mode == "classwise" else [int(k) for k in keys]
        shape = x.shape[1:]
        d = [
            torch.rand(
                shape,
                generator=torch.Generator().manual_seed(
                    cfg.seed * 7919 + s + (1 << 40) * (cfg.random_mode == "classwise")
                ),
            )
            for s in seeds
        ]
        return (torch.stack(d).to(x) * 2 - 1) * cfg.eps / 255

    return make


def noise_line(n: Dict[str, Any], eps: Any = None) -> str:
    """The written noise in one line, for the budget's norm (ε of the ℓ∞ family, ℓ2 / ℓ0 for the others)."""
    budget = n.get("budget") or f"ℓ∞ {eps:g}/255"
    tail = f"; {n['changed_samples']} of {n['samples']} samples changed" if "changed_samples" in n else ""
    if budget.startswith("ℓ2"):
        head = f"ℓ2 max {n['l2_max']:.3f}, mean {n['l2_mean'] / 255:.3f} per image"
    elif budget.startswith("ℓ0"):
        head = f"ℓ0 mean {n['l0_mean']:.2f} px, ℓ∞ max {n['linf_max']:.0f}/255"
    else:
        head = f"L∞ max {n['linf_max']:.0f}/255, mean L2 {n['l2_mean']:.1f}/255 per image"
    return f"{head} (budget {budget}, 0 violations){tail}"


def noise_summary(s: Dict[str, Any], run_dir: Path) -> str:
    """The end-of-job text of a noise stage: where the poisoned set is, its noise, the surrogate, the times, and
    the next command (a victim on the poisoned set)."""
    n = s["noise"]
    lines = [
        "",
        f"{s['method'].upper()} noise: {s['name']}",
        f"  poisoned shard set   {s['poisoned']}  ({n['samples']} samples written in this run)",
        f"  noise                {noise_line(n, s.get('eps'))}",
    ]
    if "surrogate_acc_poisoned" in s:
        clean = s.get("surrogate_acc_clean_test")
        lines.append(
            f"  surrogate            {s['surrogate_acc_poisoned']:.2f}% on the poisoned train set"
            + (f", {clean:.2f}% on the clean test set" if clean is not None else "")
        )
    if "source" in s:
        src = s["source"]
        acc = src.get("clean_test_top1")
        lines.append(
            f"  source model         {src['run']}"
            + (f" (clean test top-1 {acc:.2f}%)" if acc is not None else "")
            + (", trained by this job" if src.get("trained_here") else "")
        )
    if "rounds" in s:
        lines.append(f"  EM rounds            {s['rounds']} (surrogate error on x+δ {s['final_error']:.4f})")
    t = s["timings"]
    lines.append(
        "  time                 "
        + ", ".join(f"{k.replace('_s', '')} {v:.1f}s" for k, v in t.items())
        + (f" (over every run of the job); this run {s['wall_s']:.1f}s" if "wall_s" in s else "")
    )
    lines.append(f"  wrote                {run_dir / 'metrics.json'}, {run_dir / 'config.yaml'}")
    train = Path(str(s["train"]))
    victim, test = "<victim config>", ""
    if train.parent.name.startswith("synthetic"):  # the built-in sets: the synthetic victim, on the set's own test
        victim = "synthetic"
        test = "" if train.parent.name == "synthetic" else f" data.test={train.parent / 'test'}"
    lines.append(
        f"  next                 accelerate launch launch/victim.py --config configs/victim/{victim}.yaml "
        f"data.train={s['poisoned']}{test} name={s['name']}_victim"
    )
    return "\n".join(lines)


_NOISE_STAGE = dict(
    kind="noise", schema=NoiseConfig, inputs=("data.train", "data.test"), output="poisoned", summary=noise_summary
)


@stage("sem", **_NOISE_STAGE)
@stage("rem", **_NOISE_STAGE)
@stage("random", **_NOISE_STAGE)
def generate_noise(cfg: NoiseConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """SEM / REM / random: phase 1 (surrogate) then phase 2 (final pass); writes metrics.json; returns the summary."""
    m = load_manifest(cfg.data.train)
    device = accelerator.device
    timings: Dict[str, float] = {}
    summary: Dict[str, Any] = {"method": cfg.method, "name": cfg.name, "train": cfg.data.train, "eps": cfg.eps}
    summary["precision"] = resolved(cfg, device)
    model = None
    if cfg.method in ("sem", "rem"):
        phase1 = train_surrogate(cfg, accelerator, run_dir)
        timings["surrogate_training_s"] = phase1["time_s"]
        summary["surrogate_curve"] = phase1["curve"]
        model = load_surrogate(cfg, run_dir, m=m, device=device)
        if use_channels_last(cfg.channels_last, device):
            model = model.to(memory_format=torch.channels_last)
        amp = amp_args(cfg.bf16, device)

        def make_delta(x: torch.Tensor, y: torch.Tensor, keys: List[str]) -> torch.Tensor:
            gen = _batch_gen(cfg.seed, keys, device=x.device)
            if use_channels_last(cfg.channels_last, device):
                x = x.contiguous(memory_format=torch.channels_last)
            return noise_for_batch(cfg, model, x, y=y, eot=make_eot(cfg, m, gen), gen=gen, amp=amp)
    elif cfg.method == "random":
        make_delta = random_delta(cfg)
    else:
        raise ValueError(f"generate_noise handles sem, rem and random; {cfg.method!r} goes through uedist.engine.em")
    final = write_poisoned(cfg, accelerator, run_dir, make_delta=make_delta, stage=f"noise:{cfg.method}")
    timings["final_pass_s"] = final.pop("time_s")
    final.pop("manifest")
    summary.update(poisoned=final.pop("out"), noise=final, timings=timings)
    if model is not None:
        summary.update(surrogate_eval(cfg, model, poisoned=Path(summary["poisoned"]), accelerator=accelerator))
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "metrics.json", summary)
    accelerator.wait_for_everyone()
    return summary


def surrogate_eval(cfg: NoiseConfig, model: Normalized, *, poisoned: Path, accelerator: Any) -> Dict[str, float]:
    """The frozen surrogate's accuracy on the poisoned train set (and on the clean test set, when given)."""
    res = {
        "surrogate_acc_poisoned": evaluate(
            model,
            poisoned,
            accelerator=accelerator,
            batch_size=cfg.final_batch_size,
            num_workers=cfg.data.workers,
            bf16=use_bf16(cfg.bf16, accelerator.device),
        )["top1"]
    }
    if cfg.data.test:
        res["surrogate_acc_clean_test"] = evaluate(
            model,
            Path(cfg.data.test),
            accelerator=accelerator,
            batch_size=cfg.final_batch_size,
            num_workers=cfg.data.workers,
            bf16=use_bf16(cfg.bf16, accelerator.device),
        )["top1"]
    return res
