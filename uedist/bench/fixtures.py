"""Synthetic inputs of the benchmarks: random image batches, a manifest for the model builders, a shard set."""

from __future__ import annotations

from pathlib import Path

import torch

from uedist.config import load_config
from uedist.data.build import BuildConfig, build_shard_sets
from uedist.data.manifest import Manifest


def fake_manifest(px: int, num_classes: int) -> Manifest:
    """A manifest of an empty ``px`` × ``px`` PNG train set with ``num_classes`` classes (for model builders)."""
    return Manifest("bench", "train", [str(i) for i in range(num_classes)], (px, px), "png", [])


def random_batch(
    batch: int, px: int, num_classes: int, *, device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform images x (B, 3, px, px) in [0, 1] and labels y (B,) in [0, num_classes)."""
    x = torch.rand(batch, 3, px, px, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, num_classes, (batch,), device=device)


def build_synthetic_set(
    out: Path,
    *,
    num_train: int,
    size: int,
    shard_size: int,
    encoding: str = "png",
    workers: int = 0,
    num_test: int = 0,
    num_classes: int | None = None,
) -> Path:
    """A synthetic train shard set of ``num_train`` ``size`` px images under ``out`` (and, with ``num_test`` > 0,
    a test set of that many beside it, ``out/test``; ``num_classes``: the source's default, 10, unless given);
    returns ``out/train``. Reused when ``out`` already holds them built with the same settings."""
    splits = "[train,test]" if num_test else "[train]"
    over = [f"out={out}", f"splits={splits}", f"synthetic.num_train={num_train}", f"synthetic.size={size}"]
    over += [f"shard_size={shard_size}", f"encoding={encoding}", f"workers={workers}"]
    over += [f"synthetic.num_test={num_test}"] if num_test else []
    over += [f"synthetic.num_classes={num_classes}"] if num_classes else []
    build_shard_sets(load_config(BuildConfig, None, over), progress=False)
    return Path(out) / "train"
