"""The random-noise control: uniform noise in [−ε, ε] per sample (seeded by key) or per class (seeded by class),
written like every attack (budget checked on every sample, resumable by shard).

    accelerate launch launch/attack.py --config configs/sem/demo.yaml method=random
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal

import torch

from uedist.config import location, require
from uedist.engine.attacks.base import AttackConfig, attack_summary, finish_attack
from uedist.ops.budget import Budget
from uedist.registry import stage


@dataclass
class RandomConfig(AttackConfig):
    """Uniform noise of ℓ∞ ``budget`` (/255), one draw per sample or per class."""

    name: str = location("random")
    budget: float = 8.0  # ℓ∞ ε, /255
    random_mode: Literal["samplewise", "classwise"] = "samplewise"

    def validate(self) -> None:
        super().validate()
        require(0 < self.budget <= 64 and self.budget == int(self.budget), "budget: a whole number in (0, 64] /255")


def random_delta(cfg: RandomConfig) -> Callable:
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
        return (torch.stack(d).to(x) * 2 - 1) * cfg.budget / 255

    return make


@stage(
    "random",
    kind="attack",
    schema=RandomConfig,
    inputs=("data.train", "data.test"),
    output="poisoned",
    summary=attack_summary,
    smoke=("data.workers=0",),
    budget=("linf", "budget"),
)
def generate_random(cfg: RandomConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """The random-noise control: one map pass writing clip(x + U(−ε, ε)); returns the summary."""
    return finish_attack(cfg, accelerator, run_dir, make_delta=random_delta(cfg), budget=Budget("linf", cfg.budget))
