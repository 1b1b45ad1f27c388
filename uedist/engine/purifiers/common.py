"""The shared parts of the purifiers (baselines, D-VAE, JCDP): the input checks, per-image PSNR and its running
statistics, and the titled comparison grid of shard sets."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from uedist.data.grids import write_image_grid
from uedist.data.images import decode_image
from uedist.data.manifest import Manifest, load_manifest
from uedist.data.shards import read_shard
from uedist.engine.stats import RunningSums


class PurifyInputError(ValueError):
    """The input (or clean) set does not match the config or each other: a user error, reported plainly."""


def check_input(m: Manifest, where: str, *, num_classes: int = 0, image_size: int = 0, num_samples: int = 0) -> None:
    """A clear error when a set does not match what the config expects (0 = no expectation)."""
    got = {"classes": m.num_classes, "image size": max(m.image_size), "samples": m.num_samples}
    want = {"classes": num_classes, "image size": image_size, "samples": num_samples}
    bad = [f"{k} {got[k]} (config expects {v})" for k, v in want.items() if v and got[k] != v]
    if bad:
        raise PurifyInputError(
            f"{where} does not match the config: " + "; ".join(bad) + ". Point data.* at the "
            "right set, or fix data.num_classes / data.image_size / data.num_samples"
        )
    if m.image_size[0] != m.image_size[1] and image_size:
        raise PurifyInputError(f"{where}: non-square images {m.image_size}; data.image_size expects a square side")


def check_clean(src: Path, clean: Path) -> None:
    """The clean set must hold the same samples, sharded alike (the poisoned set is a map pass output of it)."""
    a, b = load_manifest(src), load_manifest(clean)
    a.check_compatible(b, what=f"poisoned set {src} vs clean set {clean}: ")
    if [s.count for s in a.shards] != [s.count for s in b.shards]:
        raise PurifyInputError(
            f"clean set {clean} is not sharded like {src}: give the set the poisoned one was made from"
        )


class PSNRStats:
    """Running per-image PSNR (dB, uint8 peak 255) of the input and the output against the clean images."""

    def __init__(self, device: torch.device) -> None:
        self.sums = RunningSums(device, sums=("n", "input", "output"))  # n, Σ psnr(input), Σ psnr(output)

    def update(self, x_u8: torch.Tensor, out_u8: torch.Tensor, clean_u8: torch.Tensor) -> None:
        self.sums.add(n=x_u8.shape[0], input=psnr(x_u8, clean_u8).sum(), output=psnr(out_u8, clean_u8).sum())

    def result(self, accelerator: Any) -> Dict[str, float]:
        """Collective. Covers the samples processed by this run (shards finished before a resume are not re-read)."""
        r = self.sums.result(accelerator)
        n = r["n"]
        if not n:
            return {}
        return {"psnr_samples": int(n), "psnr_input_vs_clean": r["input"] / n, "psnr_output_vs_clean": r["output"] / n}


def psnr(a_u8: torch.Tensor, b_u8: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 (B, C, H, W) batches (float64 (B,); identical images give 100 dB)."""
    mse = (a_u8.double() - b_u8.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))).clamp_max(100.0)


def read_columns(sets: Sequence[Tuple[str, Optional[Path]]], n: int) -> List[Tuple[str, np.ndarray]]:
    """The first ``n`` samples of shard 0 of each set, as (title, uint8 (n, H, W, 3)); sets share keys."""
    cols = []
    for title, folder in sets:
        if folder is None:
            continue
        m = load_manifest(folder)
        imgs = [decode_image(s.data, s.ext, m.image_size) for _, s in zip(range(n), read_shard(folder, m.shards[0]))]
        cols.append((title, np.stack(imgs)))
    return cols


def read_one_per_class(sets: Sequence[Tuple[str, Path]], n: int) -> List[Tuple[str, np.ndarray]]:
    """Like :func:`read_columns`, but the samples are the first of each of the first ``n`` labels met in shard 0
    of the first set (a face per identity, an image per class), read from every set by position; sets share keys
    (a set whose keys differ at those positions raises ValueError)."""
    m0 = load_manifest(sets[0][1])
    where: Dict[int, Tuple[int, str]] = {}
    for i, s in enumerate(read_shard(sets[0][1], m0.shards[0])):
        if s.label not in where:
            where[s.label] = (i, s.key)
            if len(where) == n:
                break
    pos = sorted(where.values())
    cols = []
    for title, folder in sets:
        m = load_manifest(folder)
        want, imgs = dict(pos), []
        for i, s in enumerate(read_shard(folder, m.shards[0])):
            if i in want:
                if s.key != want[i]:
                    raise ValueError(f"{folder}: sample {i} of shard 0 is {s.key!r}, {sets[0][1]} has {want[i]!r}")
                imgs.append(decode_image(s.data, s.ext, m.image_size))
                if len(imgs) == len(pos):
                    break
        cols.append((title, np.stack(imgs)))
    return cols


def noise_view(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a − b (uint8 image stacks (N, H, W, 3)) stretched to the full range per image, as the papers show
    perturbations ("normalized for better views"); an image with no difference is mid-grey."""
    d = a.astype(np.float32) - b.astype(np.float32)
    lo = d.min(axis=(1, 2, 3), keepdims=True)
    span = d.max(axis=(1, 2, 3), keepdims=True) - lo
    out = np.where(span > 0, (d - lo) / np.maximum(span, 1e-6) * 255.0, 128.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def diff_column(a: np.ndarray, b: np.ndarray, gain: float = 8.0) -> np.ndarray:
    """Visualize a − b (uint8 images) as 128 + gain·(a − b): mid-grey where they agree."""
    return np.clip(128 + gain * (a.astype(np.float32) - b.astype(np.float32)), 0, 255).astype(np.uint8)


def comparison_grid(columns: Sequence[Tuple[str, np.ndarray]], out: Path, thumb: int = 64) -> Path:
    """PNG: one titled column per (title, uint8 (n, H, W, 3)) entry, one row per sample (``thumb`` px tiles)."""
    n = min(len(c[1]) for c in columns)
    rows = [[imgs[i] for _, imgs in columns] for i in range(n)]
    return write_image_grid(rows, out, titles=[t for t, _ in columns], thumb=thumb)


VICTIM_CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "victim"


def victim_next(purified: str, name: str) -> str:
    """The ``next`` command of a purifier's summary: a victim trained on the purified set, with the victim config
    of its dataset when one ships (``configs/victim/<dataset>.yaml``) and evaluated on the clean test set of the
    attack that made the poisoned input (read from the two sets' provenance), where they are known."""
    victim, test = "<victim config>", ""
    try:
        m = load_manifest(purified)
        if (VICTIM_CONFIGS / f"{m.dataset}.yaml").is_file():
            victim = f"configs/victim/{m.dataset}.yaml"
        src = m.provenance["config"]["data"]["src"]
        test = str(load_manifest(src).provenance["config"]["data"]["test"] or "")
    except (OSError, ValueError, KeyError, TypeError):  # a set without that provenance: the placeholders stay
        pass
    args = [f"data.train={purified}", *([f"data.test={test}"] if test else []), f"name={name}_victim"]
    return (
        f"accelerate launch --config_file configs/accelerate/default.yaml launch/victim.py --config {victim} "
        + " ".join(shlex.quote(a) for a in args)
    )
