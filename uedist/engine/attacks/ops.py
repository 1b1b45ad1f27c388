"""OPS: the one-pixel shortcut (Wu et al., ICLR 2023). Per class one pixel position and one colour, set in every
image of the class: ℓ0 = 1 (``pixels`` positions), no model.

    accelerate launch launch/attack.py --config configs/ops/cifar10.yaml

As the reference (github.com/cychomatica/One-Pixel-Shotcut, ops_poisons_generate in APBench): the colours are
the 2^C corners of the RGB cube; for class k, position p and colour c the score is

    mean(|c − x_p|) / std(|c − x_p|)     over the class's images and the C channels (population std),

and the class takes the (p, c) of highest score not taken by an earlier class (classes in label order); its
images get pixel p set to c exactly. The scores need only per-class sums of x and x² per position and channel
(|c − x| is x where c = 0 and 1 − x where c = 1), collected in one statistics pass over the clean set on every
rank (summed across ranks) and kept in ``<run>/ops_search.json``, so a rerun skips it.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch

from uedist.config import ConfigError, identity, require
from uedist.data.manifest import content_digest, load_manifest
from uedist.engine.attacks.base import AttackConfig, attack_summary, class_sums, finish_attack
from uedist.io import atomic_write_json
from uedist.ops.budget import Budget
from uedist.registry import stage


@dataclass
class OPSConfig(AttackConfig):
    pixels: int = 1  # ℓ0 budget: positions per image (reference "sparsity" 1)

    def validate(self) -> None:
        super().validate()
        require(self.pixels >= 1, f"pixels must be >= 1, got {self.pixels}")


def ops_scores(sx: torch.Tensor, sxx: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Scores (K, H·W, 2^C) from per-class sums of x and x² (K, C, H, W) and class counts (K,)."""
    k, c, h, w = sx.shape
    colours = torch.tensor(list(itertools.product((0.0, 1.0), repeat=c)), dtype=torch.float64)  # (2^C, C), MSB first
    sx, sxx = sx.flatten(2), sxx.flatten(2)  # (K, C, P)
    nn = n.view(k, 1, 1)
    cc = colours.T.view(1, c, 1, -1).to(sx)  # (1, C, 1, 2^C)
    s1 = torch.where(cc > 0, nn[..., None] - sx[..., None], sx[..., None])  # Σ|c − x| per channel
    s2 = torch.where(cc > 0, nn[..., None] - 2 * sx[..., None] + sxx[..., None], sxx[..., None])  # Σ(c − x)²
    count = (n * c).view(k, 1, 1)
    mean = s1.sum(1) / count  # (K, P, 2^C)
    var = (s2.sum(1) / count - mean**2).clamp_min(0)
    return torch.where(var > 0, mean / var.sqrt(), torch.zeros_like(mean))


def ops_search(scores: torch.Tensor, *, pixels: int, width: int) -> List[List[Dict[str, Any]]]:
    """Per class (label order) its ``pixels`` highest-scoring (position, colour) pairs at distinct positions, no
    pair reused across classes: [{'row', 'col', 'colour': [0/1 per channel], 'score'}, ...] per class.
    ConfigError when a class cannot get ``pixels`` of them (more pixels than the image and the earlier classes
    leave), rather than leaving later classes unpoisoned."""
    c = int(round(torch.log2(torch.tensor(float(scores.shape[2]))).item()))
    taken = set()
    out: List[List[Dict[str, Any]]] = []
    for k in range(scores.shape[0]):
        order = torch.argsort(scores[k].flatten(), descending=True, stable=True).tolist()
        picks: List[Dict[str, Any]] = []
        used = set()  # a position takes one colour in an image: a class's picks are distinct positions
        for idx in order:
            pos, col = divmod(idx, scores.shape[2])
            if (pos, col) in taken or pos in used:
                continue
            taken.add((pos, col))
            used.add(pos)
            colour = [(col >> (c - 1 - i)) & 1 for i in range(c)]
            picks.append(
                {"row": pos // width, "col": pos % width, "colour": colour, "score": float(scores[k, pos, col])}
            )
            if len(picks) == pixels:
                break
        if len(picks) < pixels:
            raise ConfigError(
                f"ops: pixels={pixels} but class {k} can get only {len(picks)} distinct positions (images have "
                f"{scores.shape[1]} positions x {scores.shape[2]} colours, shared by {scores.shape[0]} classes)"
            )
        out.append(picks)
    return out


def _search(cfg: OPSConfig, accelerator: Any, run_dir: Path) -> List[List[Dict[str, Any]]]:
    m = load_manifest(cfg.data.train)
    path = run_dir / "ops_search.json"
    # keyed on the set's content, not its path: a set rebuilt in place gets a new search
    ident = {"train": content_digest(cfg.data.train), "samples": m.num_samples, "pixels": cfg.pixels}
    if cfg.resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("identity") == ident:
            return saved["classes"]
    sx, sxx, n = class_sums(
        Path(cfg.data.train),
        lambda x, y: (x, x * x),
        accelerator=accelerator,
        num_classes=m.num_classes,
        batch_size=cfg.final_batch_size,
        workers=cfg.data.workers,
        progress=cfg.progress,
    )
    empty = [i for i, v in enumerate(n.tolist()) if v == 0]
    require(not empty, f"ops: classes {empty} have no images in {cfg.data.train}")
    picks = ops_search(ops_scores(sx.cpu(), sxx.cpu(), n.cpu()), pixels=cfg.pixels, width=m.image_size[1])
    if accelerator.is_main_process:
        atomic_write_json(path, {"identity": ident, "config": identity(cfg), "classes": picks})
    accelerator.wait_for_everyone()
    return picks


def ops_delta(picks: List[List[Dict[str, Any]]]) -> Any:
    """``make_delta(x, y, keys)``: each image's class pixels set to the class colours (δ = c − x there, 0 elsewhere)."""
    table = [[(p["row"], p["col"], torch.tensor(p["colour"], dtype=torch.float32)) for p in ps] for ps in picks]

    def make(x: torch.Tensor, y: torch.Tensor, keys: List[str]) -> torch.Tensor:
        delta = torch.zeros_like(x)
        for i, k in enumerate(y.tolist()):
            for r, c, colour in table[k]:
                delta[i, :, r, c] = colour.to(x) - x[i, :, r, c]
        return delta

    return make


@stage(
    "ops",
    kind="attack",
    schema=OPSConfig,
    inputs=("data.train",),
    output="poisoned",
    summary=attack_summary,
    smoke=("data.workers=0",),
    budget=("l0", "pixels"),
)
def generate_ops(cfg: OPSConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """OPS: per class the most separating pixel and colour, set in each of its images (ℓ0 = ``pixels``)."""
    import time

    t0 = time.time()
    picks = _search(cfg, accelerator, run_dir)
    search_s = time.time() - t0
    make = ops_delta(picks)
    extra = {"pixels": cfg.pixels, "classes": picks}
    return finish_attack(
        cfg,
        accelerator,
        run_dir,
        make_delta=make,
        budget=Budget("l0", cfg.pixels),
        extra=extra,
        timings={"search_s": search_s},
    )
