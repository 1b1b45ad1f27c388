"""Purify: D-VAE two-stage purification (Yu et al., ICML 2024, Algorithm 1; docs/purify_dvae.md).

    accelerate launch launch/dvae.py --config configs/dvae/cifar10.yaml data.src=runs/sem_c10/poisoned

Stage 1 trains a D-VAE (``uedist.models.dvae``) afresh on the poisoned set P⁰ with the small kld limit, then a
shard map pass writes P¹ = x⁰ − p̂⁰. Stage 2 trains another afresh on P¹ with the larger limit; a pass writes
P² = x¹ − p̂¹ and a last pass writes P³ = x̂² (stage 2's reconstruction of P²), the purified set. Training uses
the step-based loop (DDP, checkpoints, exact resume; Adam with cosine decay and gradient clipping, as the
reference), inference passes are shard map passes (all ranks, resumable by shard), so a killed job rerun with
the same command continues where it stopped. Layout of ``runs/<name>/``: ``stage1/checkpoints``, ``p1/``,
``stage2/checkpoints``, ``p2/``, ``purified/`` (or ``out``), ``stage{1,2}_curve.csv``, ``grid.png``,
``metrics.json``.

Loss per step (Eq. 14 as coded by the reference): ‖x − x̂‖² + ‖clip(x̂ + p̂) − x‖² + λ·max(KLD, limit), λ = 0.01
when limit ≥ 1 else 0.5, plus max(‖p̂‖², 0.002) from epoch 11 on. Inference samples z (the reference does) with
noise seeded by each sample's key and the pass (P¹, P², P³ each draw their own), so a resumed pass writes what an
uninterrupted one would.

Resolution: the reference is CIFAR-only (latent at H/2 on the 32 px images); its repository also has an
ImageNet-mini config (``stem_end_block: 15``: the latent at H/8 on a 512-channel trunk, 20 epochs). Ours keeps the
CIFAR design (latent at H/2, ``uedist.models.dvae``) at every size, so that the rate constraint acts on the same
per-pixel budget whatever the resolution and the 8/255 perturbation, which lives at pixel scale, is not averaged
away by an H/8 latent before the class-wise embeddings can take it; the cost at 256 px is measured in
docs/benchmarks.md (``launch/bench/dvae.py``).
"""

from __future__ import annotations

import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch

from uedist.config import Cadence, Precision, Resumable, Seeded, identity, location, positive, require, runtime
from uedist.data.manifest import Manifest, ManifestError, load_manifest
from uedist.engine.map_pass import pass_seconds, run_map_pass
from uedist.engine.purifiers.common import (
    PSNRStats,
    PurifyInputError,
    check_clean,
    check_input,
    comparison_grid,
    diff_column,
    read_columns,
)
from uedist.engine.stats import RunningSums
from uedist.engine.train.checkpoints import check_finite
from uedist.engine.train.loop import OptimConfig, Tracker, prepare_training, run_steps, train_batches, write_curve
from uedist.engine.train.victim import ranks_in_sync
from uedist.io import atomic_write_json
from uedist.models.dvae import DVAE, dvae_loss
from uedist.ops.images import to_uint8, to_unit
from uedist.precision import amp_args, resolved, use_channels_last
from uedist.registry import stage


@dataclass
class DVAEData:
    src: str = ""  # the poisoned shard set P⁰
    clean: str = ""  # optional clean set of the same samples (sharded alike): PSNR, the grid's clean column
    num_classes: int = 0  # expected; 0 = any (a mismatch is an error naming both)
    image_size: int = 0  # expected side in px; 0 = any
    num_samples: int = 0  # expected; 0 = any
    batch_size: int = positive(128)  # global, split across ranks
    infer_batch_size: int = positive(256)
    workers: int = runtime(2)
    shuffle_buffer: int = 2000


@dataclass
class DVAEModelSpec:
    """``uedist.models.dvae.DVAE`` keyword arguments (defaults: the reference at 32 px)."""

    latent_dim: int = 256
    width: float = positive(1.0)
    stem_blocks: int = 2
    latent_blocks: int = 0  # extra encoder depth at the latent resolution (larger images)
    emb_grid: int = 16  # spatial class embedding grid, upsampled to the latent size; 0 = one vector per class


@dataclass
class AdamConfig:
    """Adam with a per-step cosine (or constant) schedule; the reference: lr 5e-3, no weight decay, cosine to 0."""

    lr: float = 5e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0

    def validate(self) -> None:
        require(self.lr > 0 and len(self.betas) == 2, "optim: lr > 0 and two betas")


@dataclass
class DVAEConfig(Cadence, Precision, Resumable, Seeded):
    # bf16 / channels_last (Precision): fp32 by default; null = auto (uedist.precision): on only where bf16 is
    # native (CUDA >= sm80, AMX / AVX-512 BF16 CPUs). On an AVX2-only CPU, bf16 autocast is emulated: a CIFAR
    # CPU-config training step measured 7.5x slower than fp32 (32.8 vs 4.35 s, one thread), so CPU configs that want
    # "bf16 where it helps" say null.
    # log_with (Cadence): "tensorboard" puts each stage's curve rows under <run>/tb/stage<k>.

    method: Literal["dvae"] = "dvae"
    name: str = location("dvae")  # redeclared for its default: the run's folder is named after the stage
    out: str = location("")  # the purified set P³; default <run_root>/<name>/purified
    data: DVAEData = field(default_factory=DVAEData)
    model: DVAEModelSpec = field(default_factory=DVAEModelSpec)
    optim: AdamConfig = field(default_factory=AdamConfig)
    epochs: float = 60.0  # per stage (converted with the input size and the global batch) ...
    steps: int = 0  # ... unless steps > 0 is given
    kld_limits: List[float] = field(default_factory=lambda: [1.0, 3.0])  # stage 1, stage 2
    kld_weight: float = 0.01  # λ when the limit is >= 1 (reference)
    kld_weight_small: float = 0.5  # λ when the limit is < 1 (reference)
    p_floor: float = 0.002  # floor on mean(p̂²) ...
    p_floor_epoch: float = 11.0  # ... added from this epoch on (reference: epoch > 10 of 60)
    grad_clip: float = 5.0
    sample_latent: bool = True  # inference samples z ~ N(μ, σ²) (reference); false: z = μ
    grid_samples: int = runtime(8)

    def validate(self) -> None:
        require(bool(self.data.src), "data.src (the poisoned shard set) is required")
        require(self.steps > 0 or self.epochs > 0, "set steps or epochs (> 0)")
        require(len(self.kld_limits) == 2 and all(k >= 0 for k in self.kld_limits), "kld_limits: two values >= 0")
        require(self.data.batch_size > 0 and self.grad_clip > 0, "data.batch_size > 0, grad_clip > 0")

    def total_steps(self, n: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * n / self.data.batch_size))


def build_dvae(cfg: DVAEConfig, m: Manifest) -> DVAE:
    s = cfg.model
    return DVAE(
        m.num_classes,
        latent_dim=s.latent_dim,
        width=s.width,
        stem_blocks=s.stem_blocks,
        latent_blocks=s.latent_blocks,
        emb_grid=s.emb_grid,
    )


def train_dvae_stage(
    cfg: DVAEConfig, stage: int, *, src: Path, accelerator: Any, run_dir: Path
) -> Tuple[DVAE, Dict[str, Any]]:
    """Train stage ``stage`` (1 or 2) afresh on ``src`` (resumable); returns the trained model in eval mode and
    the stage's summary (steps, last logged losses, DDP wrapper, whether every rank holds the same weights)."""
    m = load_manifest(src)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    total, per_epoch = cfg.total_steps(m.num_samples), m.num_samples / cfg.data.batch_size
    limit = cfg.kld_limits[stage - 1]
    weight = cfg.kld_weight if limit >= 0.99 else cfg.kld_weight_small  # the reference's `kld_target > 0.99`
    floor_step = math.ceil(cfg.p_floor_epoch * per_epoch)
    o = cfg.optim
    torch.manual_seed(cfg.seed * 10 + stage)  # same initial weights on every rank
    p = prepare_training(
        build_dvae(cfg, m),
        OptimConfig(lr=o.lr, weight_decay=o.weight_decay, schedule=o.schedule, warmup_steps=o.warmup_steps),
        total,
        accelerator=accelerator,
        ckpt_root=run_dir / f"stage{stage}",
        seed=cfg.seed * 10 + stage,
        config=cfg,
        ckpt_every=cfg.ckpt_every,
        resume=cfg.resume,
        channels_last=use_channels_last(cfg.channels_last, device),
        gen_name="dvae",
        make_opt=lambda ps: torch.optim.Adam(ps, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay),
    )
    gen = torch.Generator(device=device)
    amp, channels_last = amp_args(cfg.bf16, device), use_channels_last(cfg.channels_last, device)
    latent_shape = lambda b: (b, cfg.model.latent_dim, m.image_size[0] // 2, m.image_size[1] // 2)  # noqa: E731

    def one(batch: Dict[str, torch.Tensor], step_no: int) -> Dict[str, torch.Tensor]:
        x = to_unit(batch["image"].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # ε of the reparameterization from (seed, stage, rank, step) alone: a resumed run draws what an
        # uninterrupted one did, whatever else consumed the global RNG (e.g. the loader's worker seeds).
        g = gen.manual_seed(((cfg.seed * 10 + stage) * 1009 + rank) * 10_000_019 + step_no - 1)
        eps = torch.randn(latent_shape(x.shape[0]), generator=g, device=device)
        with torch.autocast(**amp):
            out = p.ddp(x, batch["label"].to(device, non_blocking=True), noise=eps)
        out = type(out)(*(t.float() for t in out))
        loss, terms = dvae_loss(
            out, x, kld_limit=limit, kld_weight=weight, p_floor=cfg.p_floor if step_no > floor_step else None
        )
        check_finite(loss, step_no, accelerator=accelerator, ckpt_dir=p.ckpt.dir)
        p.opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(p.model.parameters(), cfg.grad_clip)
        p.opt.step()
        return terms

    run_steps(
        p,
        one,
        lambda: train_batches(cfg.data, p, total=total, seed=cfg.seed * 10 + stage, accelerator=accelerator, src=src),
        total=total,
        desc=f"{cfg.name} D-VAE stage {stage}",
        log_every=cfg.log_every,
        progress=cfg.progress,
        accelerator=accelerator,
        tracker=Tracker(cfg.log_with, run_dir / "tb" / f"stage{stage}", accelerator),
    )
    if accelerator.is_main_process:
        write_curve(run_dir / f"stage{stage}_curve.csv", p.curve)
    info = {
        "steps": total,
        "epochs": total * cfg.data.batch_size / m.num_samples,
        "kld_limit": limit,
        "kld_weight": weight,
        "last": p.curve[-1] if p.curve else {},
        "wrapper": type(p.ddp).__name__,
        "world_size": world,
        "ranks_in_sync": ranks_in_sync(p.model, accelerator),
    }
    return p.model.eval(), info


class PassStats:
    """Per-pass sums: KLD per position, reconstruction MSE (x̂ vs the pass input), mean p̂², in [0, 1] units."""

    def __init__(self, device: torch.device) -> None:
        self.sums = RunningSums(device, sums=("n", "kld", "rec", "p2"))  # n, Σ kld, Σ mse(x̂, x), Σ mean(p̂²)

    def update(self, x: torch.Tensor, out: Any) -> None:
        k = (-0.5 * (1 + out.logvar - out.mu.pow(2) - out.logvar.exp()).sum(1)).flatten(1).mean(1)
        rec = (out.rec - x).pow(2).flatten(1).mean(1).sum()
        self.sums.add(n=x.shape[0], kld=k.sum(), rec=rec, p2=out.p.pow(2).flatten(1).mean(1).sum())

    def result(self, accelerator: Any) -> Dict[str, float]:
        r = self.sums.result(accelerator)
        n, k, r, p = r["n"], r["kld"], r["rec"], r["p2"]
        if not n:
            return {}
        return {
            "samples": int(n),
            "kld": k / n,
            "rec_mse": r / n,
            "rec_psnr": -10 * math.log10(max(r / n, 1e-12)),
            "p_rms_255": 255 * math.sqrt(p / n),
        }


class FitStats:
    """How well p̂ matches the perturbation actually there: the per-image cosine between p̂ and the pass input minus
    the clean image (``data.clean`` given; a p̂ that carries the perturbation scores near 1, one that carries image
    content or nothing near 0), and the RMS of that true perturbation (/255). Averaged over images."""

    def __init__(self, device: torch.device) -> None:
        self.sums = RunningSums(device, sums=("n", "cos", "true2"))

    def update(self, x: torch.Tensor, p: torch.Tensor, clean: torch.Tensor) -> None:
        """``x``, ``p``, ``clean`` (B, C, H, W) in [0, 1] units."""
        d, q = (x - clean).flatten(1).double(), p.flatten(1).double()
        cos = (d * q).sum(1) / (d.norm(dim=1) * q.norm(dim=1)).clamp_min(1e-12)
        self.sums.add(n=x.shape[0], cos=cos.sum(), true2=d.pow(2).mean(1).sum())

    def result(self, accelerator: Any) -> Dict[str, float]:
        r = self.sums.result(accelerator)
        if not r["n"]:
            return {}
        return {"p_cos_vs_true": r["cos"] / r["n"], "true_rms_255": 255 * math.sqrt(r["true2"] / r["n"])}


def dvae_pass(
    cfg: DVAEConfig,
    model: DVAE,
    *,
    stage: int,
    what: Literal["x_minus_p", "rec"],
    src: Path,
    dst: Path,
    accelerator: Any,
    clean: Optional[Path],
) -> Dict[str, Any]:
    """One inference map pass over ``src``: writes clip(x − p̂) or x̂ to ``dst``; returns its statistics (also
    kept per shard by the map pass, so a rerun that reuses a finished pass still reports the whole set)."""
    device = accelerator.device
    stats, psnr, fit = PassStats(device), PSNRStats(device), FitStats(device)
    amp = amp_args(cfg.bf16, device)
    side = load_manifest(src).image_size
    pass_no = stage + (what == "rec")  # P¹ = stage 1's x − p̂, P² = stage 2's x − p̂, P³ = stage 2's x̂

    @torch.no_grad()
    def fn(
        x_u8: torch.Tensor, y: torch.Tensor, keys: List[str], clean_u8: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        x = to_unit(x_u8)
        noise = None
        if cfg.sample_latent:  # ε seeded by each sample's key and the pass (P¹ 1, P² 2, P³ 3): the same whatever
            # the batch, rank count or resume, and a stream of its own for each pass
            shape = (model.latent_dim, side[0] // 2, side[1] // 2)
            noise = torch.stack(
                [
                    torch.randn(
                        shape,
                        device=device,
                        generator=torch.Generator(device=device).manual_seed(
                            cfg.seed * 1_000_003 + 7919 * pass_no + int(k)
                        ),
                    )
                    for k in keys
                ]
            )
        with torch.autocast(**amp):
            out = model(x, y, noise=noise, sample=cfg.sample_latent)
        out = type(out)(*(t.float() for t in out))
        stats.update(x, out)
        res = to_uint8(x - out.p if what == "x_minus_p" else out.rec)
        if clean_u8 is not None:
            psnr.update(x_u8, res, clean_u8)
            fit.update(x, out.p, to_unit(clean_u8))
        return res

    reused = (dst / "manifest.json").is_file()  # finished before: run_map_pass reuses it (or refuses another one)
    t0 = time.time()
    m = run_map_pass(
        src,
        dst,
        fn,
        accelerator=accelerator,
        stage=f"purify:dvae:{dst.name}",
        config={**identity(cfg), "stage": stage, "pass": what},
        batch_size=cfg.data.infer_batch_size,
        num_workers=cfg.data.workers,
        aux=clean,
        progress=cfg.progress,
        extra={"purify": {"method": "dvae", "stage": stage, "output": what}},
        stats=[stats.sums, psnr.sums, fit.sums],
    )
    res = {
        "time_s": pass_seconds(m, accelerator, time.time() - t0),  # over every run of the pass
        **stats.result(accelerator),
        **psnr.result(accelerator),
        **fit.result(accelerator),
        **({"reused": True} if reused else {}),
    }
    return res


def dvae_summary(s: Dict[str, Any], run_dir: Path) -> str:
    """The end-of-job text of a D-VAE purification: each set's KLD and PSNR, the times, the next command."""
    lines = ["", f"D-VAE purification: {s['name']}  (kld limits {s['kld_limits'][0]} / {s['kld_limits'][1]})"]
    for key, label in (("p1", "P1 = x0 - p0"), ("p2", "P2 = x1 - p1"), ("purified_stats", "P3 = rec(P2)")):
        r = s[key]
        row = (
            f"  {label:14s} KLD {r.get('kld', float('nan')):.3f}/pos, rec PSNR {r.get('rec_psnr', float('nan')):.2f} dB"
        )
        if "psnr_output_vs_clean" in r:
            row += f", vs clean {r['psnr_input_vs_clean']:.2f} -> {r['psnr_output_vs_clean']:.2f} dB"
        if "p_cos_vs_true" in r:
            row += f", cos(p̂, x − clean) {r['p_cos_vs_true']:.3f}"
        lines.append(row + (" (reused)" if r.get("reused") else ""))
    lines.append(f"  purified set   {s['purified']}")
    lines.append(
        "  time           "
        + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in s["timings"].items())
        + (f" (over every run of the job); this run {s['wall_s']:.0f}s" if "wall_s" in s else "")
    )
    lines.append(f"  wrote          {run_dir / 'metrics.json'}, {s['grid']}")
    lines.append(
        f"  next           accelerate launch launch/victim.py --config <victim config> "
        f"{shlex.quote('data.train=' + str(s['purified']))} {shlex.quote('name=' + s['name'] + '_victim')}"
    )
    return "\n".join(lines)


@stage(
    "dvae",
    kind="purify",
    schema=DVAEConfig,
    inputs=("data.src", "data.clean"),
    output="purified",
    summary=dvae_summary,
    input_errors=(PurifyInputError, ManifestError),
    smoke=(
        "model.width=0.125",
        "model.latent_dim=8",
        "data.batch_size=32",
        "data.infer_batch_size=40",
        "data.workers=0",
        "steps=4",
        "log_every=2",
        "ckpt_every=2",
        "grid_samples=4",
    ),
)
def purify_dvae(cfg: DVAEConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """Algorithm 1: two stages of training and inference; writes P¹, P², P³, grid.png, metrics.json."""
    p0, clean = Path(cfg.data.src), Path(cfg.data.clean) if cfg.data.clean else None
    m = load_manifest(p0)
    check_input(
        m,
        f"poisoned set {p0}",
        num_classes=cfg.data.num_classes,
        image_size=cfg.data.image_size,
        num_samples=cfg.data.num_samples,
    )
    if clean is not None:
        check_clean(p0, clean)
    p1, p2 = run_dir / "p1", run_dir / "p2"
    p3 = Path(cfg.out) if cfg.out else run_dir / "purified"
    t: Dict[str, float] = {}
    s: Dict[str, Any] = {
        "method": "dvae",
        "name": cfg.name,
        "input": str(p0),
        "clean": str(clean or ""),
        "kld_limits": cfg.kld_limits,
        "precision": resolved(cfg, accelerator.device),
        "sets": {"p1": str(p1), "p2": str(p2), "purified": str(p3)},
    }
    t0 = time.time()
    model, s["stage1"] = train_dvae_stage(cfg, 1, src=p0, accelerator=accelerator, run_dir=run_dir)
    t["stage1_train_s"] = time.time() - t0
    s["p1"] = dvae_pass(cfg, model, stage=1, what="x_minus_p", src=p0, dst=p1, accelerator=accelerator, clean=clean)
    t0 = time.time()
    model, s["stage2"] = train_dvae_stage(cfg, 2, src=p1, accelerator=accelerator, run_dir=run_dir)
    t["stage2_train_s"] = time.time() - t0
    s["p2"] = dvae_pass(cfg, model, stage=2, what="x_minus_p", src=p1, dst=p2, accelerator=accelerator, clean=clean)
    s["purified_stats"] = dvae_pass(
        cfg, model, stage=2, what="rec", src=p2, dst=p3, accelerator=accelerator, clean=clean
    )
    s["timings"] = {
        **t,
        "p1_pass_s": s["p1"]["time_s"],
        "p2_pass_s": s["p2"]["time_s"],
        "p3_pass_s": s["purified_stats"]["time_s"],
    }
    s["purified"] = str(p3)
    if accelerator.is_main_process:
        cols = read_columns(
            [("poisoned", p0), ("P1", p1), ("P2", p2), ("purified", p3), ("clean", clean)], cfg.grid_samples
        )
        cols.insert(1, ("p^0 x8", diff_column(cols[0][1], cols[1][1])))  # p̂⁰ ≈ P⁰ − P¹ (up to clipping)
        s["grid"] = str(comparison_grid(cols, run_dir / "grid.png"))
        atomic_write_json(run_dir / "metrics.json", s)
    accelerator.wait_for_everyone()
    return s
