"""Adding a stage is one module plus one YAML: this module *is* that module, for one attack and one purifier.

It defines a toy attack (``toy_checker``: a class-wise ±budget checkerboard) and a toy purifier
(``toy_posterize``: each pixel to the middle of one of ``levels`` equal bins), each with its own config schema,
registered with ``@stage``; nothing else in the tree names them. ``tests/conftest.py`` puts this module in
``UEDIST_PLUGINS`` (``TEST_PLUGINS``), so the registry-parametrized tests (``tests/test_stages_smoke.py``) collect
both and the launch scripts and the study pipeline, run as subprocesses, find them; ``tests/test_stage_registry.py``
runs them alone and in a study. Not a test module (pytest does not collect it), so it is imported under one name
only (``tests.toy_stages``) and registers once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import torch

from uedist.config import identity, location, require, runtime
from uedist.engine.map_pass import run_map_pass
from uedist.io import atomic_write_json
from uedist.ops.noise import quantize_noise
from uedist.registry import stage


# ------------------------------------------------------------------------------------------------------ the attack
@dataclass
class ToyData:
    train: str = ""
    test: str = ""
    workers: int = runtime(0)


@dataclass
class ToyAttackConfig:
    method: str = "toy_checker"
    name: str = location("toy")
    run_root: str = location("runs")
    out: str = location("")
    data: ToyData = field(default_factory=ToyData)
    budget: int = 4  # ℓ∞, /255
    progress: bool = runtime(False)


def toy_summary(s: Dict[str, Any], run_dir: Path) -> str:
    return f"toy checkerboard noise: {s['poisoned']} ({s['samples']} samples)"


@stage(
    "toy_checker",
    kind="attack",
    schema=ToyAttackConfig,
    inputs=("data.train", "data.test"),
    output="poisoned",
    summary=toy_summary,
    smoke=("budget=3",),
    budget=("linf", "budget"),
)
def generate_toy(cfg: ToyAttackConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """A class-wise ±budget checkerboard whose phase is the label (an ordinary, if weak, class-wise shortcut)."""
    out = Path(cfg.out) if cfg.out else run_dir / "poisoned"

    def fn(x_u8: torch.Tensor, y: torch.Tensor, keys: List[str]) -> torch.Tensor:
        h, w = x_u8.shape[-2:]
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        sign = ((ii + jj)[None] + y[:, None, None]) % 2 * 2 - 1  # (B, H, W) in {-1, 1}
        return quantize_noise(x_u8, sign[:, None].float().expand_as(x_u8) * cfg.budget / 255, cfg.budget)

    m = run_map_pass(
        Path(cfg.data.train),
        out,
        fn,
        accelerator=accelerator,
        stage="attack:toy_checker",
        config=identity(cfg),
        batch_size=64,
        num_workers=cfg.data.workers,
        progress=cfg.progress,
    )
    s = {"method": cfg.method, "name": cfg.name, "poisoned": str(out), "samples": m.num_samples}
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "metrics.json", s)
    return s


# ---------------------------------------------------------------------------------------------------- the purifier
@dataclass
class ToyPurifyData:
    src: str = ""
    clean: str = ""
    workers: int = runtime(0)


@dataclass
class ToyPurifyConfig:
    method: str = "toy_posterize"
    name: str = location("toy_purify")
    run_root: str = location("runs")
    out: str = location("")
    data: ToyPurifyData = field(default_factory=ToyPurifyData)
    levels: int = 8  # bins per channel
    progress: bool = runtime(False)

    def validate(self) -> None:
        require(2 <= self.levels <= 256, f"levels must be in 2..256, got {self.levels}")


def posterize(x_u8: torch.Tensor, levels: int) -> torch.Tensor:
    """Each level to the middle of its bin (``levels`` equal bins over 0..255)."""
    width = 256 / levels
    return ((torch.floor(x_u8.double() / width) + 0.5) * width).floor().clamp(0, 255).to(torch.uint8)


def toy_purify_summary(s: Dict[str, Any], run_dir: Path) -> str:
    return f"toy posterize ({s['levels']} levels): {s['purified']} ({s['samples']} samples)"


@stage(
    "toy_posterize",
    kind="purify",
    schema=ToyPurifyConfig,
    inputs=("data.src", "data.clean"),
    output="purified",
    summary=toy_purify_summary,
    smoke=("levels=4",),
)
def purify_toy(cfg: ToyPurifyConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """Posterize every image to ``levels`` levels per channel (removes noise smaller than a bin, if not much)."""
    out = Path(cfg.out) if cfg.out else run_dir / "purified"
    m = run_map_pass(
        Path(cfg.data.src),
        out,
        lambda x_u8, y, keys: posterize(x_u8, cfg.levels),
        accelerator=accelerator,
        stage="purify:toy_posterize",
        config=identity(cfg),
        batch_size=64,
        num_workers=cfg.data.workers,
        progress=cfg.progress,
    )
    s = {"method": cfg.method, "name": cfg.name, "purified": str(out), "levels": cfg.levels, "samples": m.num_samples}
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "metrics.json", s)
    return s
