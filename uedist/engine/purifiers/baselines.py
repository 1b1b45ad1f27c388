"""Purify with the simple baselines: ISS (grayscale, JPEG, bit-depth reduction; Liu et al., ICML 2023) and 3×3
low-pass filters (mean, median, Gaussian), each one shard map pass from a poisoned set to a purified set.

    accelerate launch launch/purify.py --config configs/purify/jpeg10.yaml data.src=runs/sem_c10/poisoned

Every purifier is a registered stage (``uedist.registry.stage``) whose entry is ``fn(cfg, accelerator, run_dir) ->
summary``: the baselines below (one ``PurifyConfig``, ``method`` picks the op), ``dvae``, ``jcdp``, ``diffusion``. The
purified set keeps keys and labels, is stored losslessly (PNG), and records its parents and config. With
``data.clean`` (the clean set the poisoned one was made from, sharded alike) the pass also reports PSNR of the
poisoned and the purified images against the clean ones. The shared parts of the purifiers (input checks,
PSNR statistics, comparison grid) are in ``uedist.engine.purifiers.common``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional

import torch

from uedist.config import JobConfig, identity, location, positive, require, runtime
from uedist.data.manifest import ManifestError, load_manifest
from uedist.dist import get_logger
from uedist.engine.map_pass import run_map_pass
from uedist.engine.purifiers.common import (
    PSNRStats,
    PurifyInputError,
    check_clean,
    check_input,
    comparison_grid,
    read_columns,
    victim_next,
)
from uedist.io import atomic_write_json
from uedist.ops import iss
from uedist.ops.images import to_uint8, to_unit
from uedist.registry import stage

log = get_logger(__name__)


BASELINES = ("grayscale", "jpeg", "bit_depth", "mean", "median", "gaussian")


@dataclass
class BaselineData:
    src: str = ""  # the poisoned shard set
    clean: str = ""  # optional: the clean set it was made from (same keys, sharded alike): PSNR, grid column
    num_classes: int = 0  # expected number of classes; 0 = any
    image_size: int = 0  # expected image side in px; 0 = any
    num_samples: int = 0  # expected number of samples; 0 = any
    batch_size: int = positive(256)
    workers: int = runtime(2)


@dataclass
class PurifyConfig(JobConfig):
    """One baseline pass. Parameters in the units of the papers: JPEG quality 1..100, bits 1..8, kernel px.
    Deterministic and one pass: no seed, resume (the map pass resumes by shard), precision or cadence fields."""

    method: Literal["grayscale", "jpeg", "bit_depth", "mean", "median", "gaussian"] = "jpeg"
    name: str = location("purify")  # redeclared for its default: the run's folder is named after the stage
    out: str = location("")  # default <run_root>/<name>/purified
    data: BaselineData = field(default_factory=BaselineData)
    quality: int = 10  # jpeg (ISS: 10)
    bits: int = 2  # bit_depth (ISS: 2)
    kernel: int = 3  # mean / median / gaussian
    sigma: float = 0.8  # gaussian (OpenCV's rule for 3×3)
    grid_samples: int = runtime(8)

    def validate(self) -> None:
        require(bool(self.data.src), "data.src (the poisoned shard set) is required")
        require(1 <= self.quality <= 100, f"quality must be in 1..100, got {self.quality}")
        require(1 <= self.bits <= 8, f"bits must be in 1..8, got {self.bits}")
        require(self.kernel >= 1 and self.kernel % 2 == 1, f"kernel must be odd and >= 1, got {self.kernel}")
        require(self.sigma > 0, f"sigma must be > 0, got {self.sigma}")


def baseline_op(cfg: PurifyConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The baseline's tensor op: float (B, 3, H, W) in [0, 1] -> same."""
    ops: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "grayscale": iss.grayscale,
        "jpeg": lambda x: iss.jpeg(x, cfg.quality),
        "bit_depth": lambda x: iss.bit_depth(x, cfg.bits),
        "mean": lambda x: iss.mean_filter(x, cfg.kernel),
        "median": lambda x: iss.median_filter(x, cfg.kernel),
        "gaussian": lambda x: iss.gaussian_filter(x, cfg.kernel, cfg.sigma),
    }
    return ops[cfg.method]


def purify_baseline(cfg: PurifyConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """One map pass applying the baseline op; writes the purified set, grid.png and metrics.json."""
    src, clean = Path(cfg.data.src), Path(cfg.data.clean) if cfg.data.clean else None
    m = load_manifest(src)
    check_input(
        m,
        f"input set {src}",
        num_classes=cfg.data.num_classes,
        image_size=cfg.data.image_size,
        num_samples=cfg.data.num_samples,
    )
    if clean is not None:
        check_clean(src, clean)
    out = Path(cfg.out) if cfg.out else run_dir / "purified"
    op, stats = baseline_op(cfg), PSNRStats(accelerator.device)

    def fn(
        x_u8: torch.Tensor, y: torch.Tensor, keys: List[str], clean_u8: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        res = to_uint8(op(to_unit(x_u8)))
        if clean_u8 is not None:
            stats.update(x_u8, res, clean_u8)
        return res

    t0 = time.time()
    run_map_pass(
        src,
        out,
        fn,
        accelerator=accelerator,
        stage=f"purify:{cfg.method}",
        config=identity(cfg),
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.workers,
        aux=clean,
        progress=cfg.progress,
        extra={"purify": {"method": cfg.method, **_params(cfg)}},
        stats=[stats.sums],
    )
    seconds = time.time() - t0
    summary: Dict[str, Any] = {
        "method": cfg.method,
        "name": cfg.name,
        "input": str(src),
        "purified": str(out),
        "params": _params(cfg),
        "samples": m.num_samples,
        "time_s": seconds,
        **stats.result(accelerator),
    }
    if accelerator.is_main_process:
        cols = [("poisoned", src), ("purified", out)] + ([("clean", clean)] if clean else [])
        summary["grid"] = str(comparison_grid(read_columns(cols, cfg.grid_samples), run_dir / "grid.png"))
        atomic_write_json(run_dir / "metrics.json", summary)
    accelerator.wait_for_everyone()
    return summary


def _params(cfg: PurifyConfig) -> Dict[str, Any]:
    return {
        "jpeg": {"quality": cfg.quality},
        "bit_depth": {"bits": cfg.bits},
        "mean": {"kernel": cfg.kernel},
        "median": {"kernel": cfg.kernel},
        "gaussian": {"kernel": cfg.kernel, "sigma": cfg.sigma},
    }.get(cfg.method, {})


def baseline_summary(s: Dict[str, Any], run_dir: Path) -> str:
    """The end-of-job text of a baseline purification."""
    psnr = (
        f"; PSNR vs clean {s['psnr_input_vs_clean']:.2f} -> {s['psnr_output_vs_clean']:.2f} dB"
        if "psnr_output_vs_clean" in s
        else ""
    )
    params = f" {s['params']}" if s["params"] else ""
    return (
        f"\n{s['method']}{params}: {s['samples']} images -> {s['purified']} in {s['time_s']:.1f}s "
        f"({s['samples'] / max(s['time_s'], 1e-9):.0f} img/s){psnr}\nwrote {run_dir / 'metrics.json'}, {s['grid']}"
        f"\nnext  {victim_next(s['purified'], s['name'])}"
    )


for _name in BASELINES:  # one schema, one function, six stages (``method`` picks the op)
    stage(
        _name,
        kind="purify",
        schema=PurifyConfig,
        inputs=("data.src", "data.clean"),
        output="purified",
        summary=baseline_summary,
        input_errors=(PurifyInputError, ManifestError),
        smoke=("data.workers=0", "data.batch_size=40"),
    )(purify_baseline)
