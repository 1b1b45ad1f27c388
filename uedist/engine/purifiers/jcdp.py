"""Purify an unlearnable shard set with a trained DDPM: JCDP (LE paper, Algorithm 1) or plain diffusion.

    accelerate launch launch/jcdp.py --config configs/jcdp/cifar10.yaml ddpm=runs/<ddpm run>

A shard map pass over the poisoned set (all ranks, batched, resumable by shard): each batch is mapped to [-1, 1],
purified by ``uedist.diffusion.purify.purify`` — N rounds of diffuse-to-T_p-and-denoise, the reverse means
shifted by σ_t²(d₁ + d₂) toward the equally-noised unlearnable image (MSE on the steps in ``mse_t``, LPIPS on
those in ``lpips_t``) — and written losslessly with the same keys and labels. Every random draw of a batch comes
from a generator seeded by the run seed and the batch's first key, so a resumed pass writes what an
uninterrupted one would. ``method: diffusion`` drops the guidance (AVATAR-style diffuse to t* and denoise).
Ends with a PNG grid (alternating lines: poisoned | purified) and metrics.json (timing, distances).
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

import numpy as np
import torch

from uedist.config import BF16, Seeded, identity, location, positive, require, runtime
from uedist.data.grids import write_image_grid
from uedist.data.loaders import make_map_loader
from uedist.diffusion.purify import jcdp_guidance, purify, reference_lambdas
from uedist.diffusion.schedule import Schedule
from uedist.dist import get_logger
from uedist.engine.map_pass import run_map_pass
from uedist.engine.stats import RunningSums
from uedist.engine.train.ddpm import load_ddpm
from uedist.io import atomic_write_json
from uedist.models.lpips import build_lpips
from uedist.ops.images import to_uint8, to_unit
from uedist.precision import amp_args
from uedist.registry import stage

log = get_logger(__name__)


@dataclass
class LPIPSSpec:
    net: Literal["alex", "vgg", "squeeze"] = "alex"  # the reference: AlexNet
    backbone: str = "auto"  # trunk weights: a path, "auto" (torch hub cache), or "random" (explicit; not perceptual)


@dataclass
class JCDPData:
    src: str = "runs/sem_c10/poisoned"  # the unlearnable shard set to purify
    clean: str = ""  # optional: the clean originals (sharded alike) -> PSNR to clean in metrics.json
    batch_size: int = positive(256)
    workers: int = runtime(2)


@dataclass
class JCDPConfig(BF16, Seeded):
    """Defaults: the LE reference (T_p 20, N 4, MSE for paper steps t ≥ 12 and LPIPS-AlexNet for t ≤ 11 — the
    reference's 0-based i > 10 / i ≤ 10 —, the full reverse chain, and its guidance schedule: λ₁, λ₂ vary with t
    as s_t = √(1 − ᾱ_t)/(m·√ᾱ_t) on batch-mean losses, converted to our per-image sums). ``guidance=constant``
    uses ``lam_mse`` / ``lam_lpips`` instead (ours; the earlier default)."""

    # bf16 (BF16): autocast for the UNet (guidance gradients stay fp32); null = auto where native. No resume field:
    # the map pass resumes by shard by itself.

    method: Literal["jcdp", "diffusion"] = "jcdp"  # diffusion: plain diffusion purification, no guidance
    name: str = location("jcdp")  # redeclared for its default: the run's folder is named after the stage
    out: str = location("")  # the purified shard set; default <run_root>/<name>/purified
    ddpm: str = ""  # a DDPM run folder (launch/ddpm.py) or checkpoint folder
    use_ema: bool = True
    data: JCDPData = field(default_factory=JCDPData)
    t_p: int = 20  # T_p (plain: t*), a paper step in [1, T]
    rounds: int = 4  # N (plain: 1 in the reference baseline)
    stride: int = 1  # reverse chain visits every stride-th step (1 = the full chain; >1 a strided-chain deviation)
    variance: Literal["beta", "posterior"] = "beta"  # σ_t²: β_t ("fixedlarge", DDPM CIFAR-10 / the LE code's
    #   pytorch_diffusion sampler) or β̃_t; with β̃ the last step has σ² = 0, so it takes no guidance at all
    guidance: Literal["reference", "constant"] = "reference"  # λ₁, λ₂: the reference's schedule, or the constants
    guide_scale: float = 70000.0  # the reference's guide_scale (m = (8·2/255/3) / guide_scale)
    ref_batch: int = positive(500)  # the batch the reference's losses are averaged over (its batch: 500)
    lam_mse: float = 100.0  # guidance=constant: λ₁ on ‖x*_t − x̃_t‖² (summed per image)
    lam_lpips: float = 1000.0  # guidance=constant: λ₂ on LPIPS(x*_t, x̃_t)
    mse_t: Tuple[int, int] = (12, 1000)  # paper steps t (inclusive) guided by MSE (reference: 0-based i > 10)
    lpips_t: Tuple[int, int] = (1, 11)  # paper steps t (inclusive) guided by LPIPS (reference: i ≤ 10)
    lpips: LPIPSSpec = field(default_factory=LPIPSSpec)
    grid: int = runtime(16)  # images in the poisoned | purified grid (0 = none)
    overwrite: bool = runtime(False)  # rebuild a finished purified set of other settings (how, not what: runtime)

    def validate(self) -> None:
        require(self.t_p >= 1 and self.rounds >= 1 and self.stride >= 1, "t_p, rounds, stride must be >= 1")
        require(self.t_p % self.stride == 0, f"t_p {self.t_p} must be a multiple of stride {self.stride}")
        require(self.lam_mse >= 0 and self.lam_lpips >= 0, "lam_mse, lam_lpips must be >= 0")
        require(self.mse_t[0] <= self.mse_t[1] and self.lpips_t[0] <= self.lpips_t[1], "mse_t / lpips_t: [lo, hi]")

    @property
    def guided(self) -> bool:
        if self.method != "jcdp":
            return False
        return self.guidance == "reference" or self.lam_mse > 0 or self.lam_lpips > 0

    @property
    def uses_lpips(self) -> bool:
        return self.guided and (self.guidance == "reference" or self.lam_lpips > 0)


def chain(cfg: JCDPConfig, s: Schedule) -> Schedule:
    """The reverse chain: all steps, or every ``stride``-th (steps stride, 2·stride, ..., T in paper numbering)."""
    return s if cfg.stride == 1 else s.respaced(range(cfg.stride - 1, s.T, cfg.stride))


def lambdas(cfg: JCDPConfig, full: Schedule) -> Optional[Callable[[int, int], Tuple[float, float]]]:
    """The per-step (λ₁, λ₂) of ``guidance=reference`` from the chain's ᾱ (full or strided); None = constants."""
    if cfg.guidance != "reference":
        return None
    ab = dict(zip((full.steps + 1).tolist(), full.ac.tolist()))  # paper step -> ᾱ (a strided chain keeps ᾱ)
    return reference_lambdas(ab.__getitem__, guide_scale=cfg.guide_scale, ref_batch=cfg.ref_batch)


def mse_pull(cfg: JCDPConfig, s: Schedule, *, dim: int = 3 * 32 * 32, full: Optional[Schedule] = None) -> float:
    """The largest 2·λ₁·σ_t² over the MSE-guided steps of the chain: the fraction of the gap x̃_t − x*_t that one
    guided step adds to the mean (> 1 overshoots). It grows with σ_t², i.e. with T_p and the stride."""
    lams = lambdas(cfg, full if full is not None else s)
    if not cfg.guided or (lams is None and not cfg.lam_mse):
        return 0.0
    pulls = [
        2 * (lams(int(t), dim)[0] if lams is not None else cfg.lam_mse) * float(v)
        for t, v in zip((s.steps + 1).tolist(), s.var.tolist())
        if t <= cfg.t_p and cfg.mse_t[0] <= t <= cfg.mse_t[1]
    ]
    return max(pulls, default=0.0)


def make_purifier(cfg: JCDPConfig, device: torch.device):
    """fn(x_u8 (B, 3, H, W), keys) -> purified uint8, for the map pass (and the benchmark)."""
    net, dcfg = load_ddpm(cfg.ddpm, device, prefer_ema=cfg.use_ema)
    s = replace(dcfg.diffusion, variance=cfg.variance).schedule()
    require(cfg.t_p <= s.T, f"t_p {cfg.t_p} exceeds the DDPM's T = {s.T}")
    if dcfg.t_max and cfg.t_p > dcfg.t_max:
        log.warning("t_p %d is beyond the steps this DDPM was trained on (t_max %d)", cfg.t_p, dcfg.t_max)
    full, s = s, chain(cfg, s)
    pull = mse_pull(cfg, s, full=full)
    if pull > 1:
        log.warning(
            "MSE guidance overshoots: 2·λ₁·σ_t² reaches %.2f > 1 on this chain, so the guided mean moves past "
            "the noised unlearnable image (lower lam_mse, or the stride)",
            pull,
        )
    amp = amp_args(cfg.bf16, device)
    guide = None
    if cfg.guided:
        lp = build_lpips(cfg.lpips.net, cfg.lpips.backbone).to(device) if cfg.uses_lpips else None
        guide = jcdp_guidance(
            lp,
            lam_mse=cfg.lam_mse,
            lam_lpips=cfg.lam_lpips,
            mse_t=tuple(cfg.mse_t),
            lpips_t=tuple(cfg.lpips_t),
            lams=lambdas(cfg, full),
        )

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(**amp):
            return net(x, t).float()

    def fn(x_u8: torch.Tensor, keys: List[str]) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + int(keys[0]))
        x = purify(eps_fn, s, to_unit(x_u8) * 2 - 1, t_p=cfg.t_p, rounds=cfg.rounds, gen=gen, guide=guide)
        return to_uint8((x + 1) / 2)

    return fn


class Distances:
    """Per-rank sums of squared error (purified vs poisoned, and vs clean when given), reduced at the end."""

    def __init__(self, device: torch.device) -> None:
        # n, Σ mse(out, poisoned), Σ mse(out, clean), Σ mse(poisoned, clean), in uint8 units
        self.sums = RunningSums(device, sums=("n", "to_poisoned", "to_clean", "poisoned_to_clean"))

    def update(self, poisoned: torch.Tensor, out: torch.Tensor, clean: Optional[torch.Tensor]) -> None:
        mse = lambda a, b: (a.double() - b.double()).pow(2).flatten(1).mean(1).sum()  # noqa: E731 (uint8 units)
        self.sums.add(n=poisoned.shape[0], to_poisoned=mse(out, poisoned))
        if clean is not None:
            self.sums.add(to_clean=mse(out, clean), poisoned_to_clean=mse(poisoned, clean))

    def result(self, accelerator: Any, with_clean: bool) -> Dict[str, float]:
        r = self.sums.result(accelerator)
        n = r["n"]
        psnr = lambda m: float(10 * np.log10(255.0**2 / max(m / max(n, 1), 1e-12)))  # noqa: E731
        res = {"samples": int(n), "psnr_to_poisoned": psnr(r["to_poisoned"])}
        if with_clean:
            res.update(psnr_to_clean=psnr(r["to_clean"]), psnr_poisoned_to_clean=psnr(r["poisoned_to_clean"]))
        return res


def purify_shards(cfg: JCDPConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """The map pass poisoned -> purified (resumable by shard); writes grid.png and metrics.json; returns metrics."""
    device = accelerator.device
    out = Path(cfg.out) if cfg.out else run_dir / "purified"
    fn = make_purifier(cfg, device)
    dist = Distances(device)
    clean = Path(cfg.data.clean) if cfg.data.clean else None

    def map_fn(x: torch.Tensor, y: torch.Tensor, keys: List[str], c: Optional[torch.Tensor] = None) -> torch.Tensor:
        r = fn(x, keys)
        dist.update(x, r, c)
        return r

    t0 = time.time()
    m = run_map_pass(
        Path(cfg.data.src),
        out,
        map_fn,
        accelerator=accelerator,
        stage=f"purify:{cfg.method}",
        config=identity(cfg),
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.workers,
        extra={
            "purifier": {
                "method": cfg.method,
                "t_p": cfg.t_p,
                "rounds": cfg.rounds,
                "stride": cfg.stride,
                "ddpm": cfg.ddpm,
            }
        },
        overwrite=cfg.overwrite,
        parents=[cfg.ddpm],
        stats=[dist.sums],
        progress=cfg.progress,
        aux=clean,
    )
    dt = time.time() - t0
    res = dist.result(accelerator, clean is not None)
    metrics: Dict[str, Any] = {
        "name": cfg.name,
        "method": cfg.method,
        "purified": str(out),
        "poisoned": cfg.data.src,
        "ddpm": cfg.ddpm,
        "t_p": cfg.t_p,
        "rounds": cfg.rounds,
        "stride": cfg.stride,
        "denoising_steps_per_image": cfg.rounds * cfg.t_p // cfg.stride,
        "guided": cfg.guided,
        "guidance": cfg.guidance if cfg.guided else None,
        "guide_scale": cfg.guide_scale if cfg.guided and cfg.guidance == "reference" else None,
        "lam_mse": cfg.lam_mse if cfg.guided and cfg.guidance == "constant" else 0.0,
        "lam_lpips": cfg.lam_lpips if cfg.guided and cfg.guidance == "constant" else 0.0,
        "mse_t": list(cfg.mse_t),
        "lpips_t": list(cfg.lpips_t),
        "lpips": {"net": cfg.lpips.net, "backbone": cfg.lpips.backbone} if cfg.uses_lpips else None,
        "time_s": dt,
        "images_per_s": res["samples"] / dt if res["samples"] else None,
        "world_size": accelerator.num_processes,
        "num_samples": m.num_samples,
        **res,
    }
    if accelerator.is_main_process:
        if cfg.grid:
            metrics["grid"] = str(purification_grid(Path(cfg.data.src), out, n=cfg.grid, path=run_dir / "grid.png"))
        atomic_write_json(run_dir / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    return metrics


def purification_grid(poisoned: Path, purified: Path, *, n: int, path: Path) -> Path:
    """The first ``n`` samples of shard 0: alternating lines of 8, poisoned above purified."""
    a = next(iter(make_map_loader(poisoned, batch_size=n, shards=[0])))["image"]
    b = next(iter(make_map_loader(purified, batch_size=n, shards=[0])))["image"]
    rows = []
    for j in range(0, a.shape[0], 8):
        rows += [a[j : j + 8], b[j : j + 8]]
    return write_image_grid([r.permute(0, 2, 3, 1).cpu().numpy() for r in rows], path)


def jcdp_summary(m: Dict[str, Any], run_dir: Path) -> str:
    """The end-of-job text of a JCDP / plain diffusion purification."""
    if not m["guided"]:
        guide = "no guidance"
    elif m.get("guidance") == "reference":
        guide = f"the reference's guidance schedule (guide_scale {m['guide_scale']:g}; LPIPS {m['lpips']})"
    else:
        guide = f"λ₁ {m['lam_mse']:g} (MSE), λ₂ {m['lam_lpips']:g} (LPIPS {m['lpips']})"
    lines = [
        "",
        f"{m['name']}: {m['method']} purification, N {m['rounds']} x T_p {m['t_p']} (stride {m['stride']}), {guide}",
        f"  purified shard set  {m['purified']}  ({m['num_samples']} samples; {m['samples']} written in this run)",
    ]
    if m["samples"]:
        extra = (
            f", to clean {m['psnr_to_clean']:.2f} dB (poisoned to clean {m['psnr_poisoned_to_clean']:.2f} dB)"
            if "psnr_to_clean" in m
            else ""
        )
        lines += [
            f"  PSNR                to poisoned {m['psnr_to_poisoned']:.2f} dB{extra}",
            f"  time                {m['time_s']:.1f} s, {m['images_per_s']:.2f} img/s on {m['world_size']} "
            "process(es)",
        ]
    lines += [
        f"  wrote               {run_dir / 'metrics.json'}" + (f", {m['grid']}" if m.get("grid") else ""),
        f"  next                accelerate launch launch/victim.py --config configs/victim/cifar10_quick.yaml "
        f"{shlex.quote('data.train=' + str(m['purified']))} {shlex.quote('name=' + m['name'] + '_victim')}",
    ]
    return "\n".join(lines)


_DIFFUSION_STAGE = dict(
    kind="purify",
    schema=JCDPConfig,
    inputs=("data.src", "data.clean", "ddpm"),
    output="purified",
    summary=jcdp_summary,
    check=lambda c: None if c.ddpm else "ddpm=<DDPM run folder> is required (launch/ddpm.py)",
)


_DIFFUSION_SMOKE = (
    "t_p=4",
    "stride=2",
    "data.batch_size=40",
    "data.workers=0",
    "lpips.backbone=random",
    "lpips.net=vgg",
    "grid=4",
    "rounds=1",
)


@stage("jcdp", **_DIFFUSION_STAGE, smoke=(*_DIFFUSION_SMOKE, "lam_lpips=0.0"))
@stage("diffusion", **_DIFFUSION_STAGE, smoke=_DIFFUSION_SMOKE)
def purify_jcdp(cfg: JCDPConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """JCDP (LE Algorithm 1) or plain diffusion purification (method diffusion, the baseline JCDP improves on)."""
    return purify_shards(cfg, accelerator, run_dir)
