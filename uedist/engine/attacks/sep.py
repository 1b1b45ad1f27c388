"""SEP: self-ensemble protection (Chen et al., ICLR 2023 / CVPR-era "SEP-FA-VR"). The checkpoints of one clean
training run form an ensemble; δ pulls each image's penultimate features towards the centroid of a wrong class
under every checkpoint, with variance-reduced ensemble steps.

    accelerate launch launch/attack.py --config configs/sep/cifar10.yaml [source_model=runs/<victim with snapshots>]

As the reference (github.com/Sizhe-Chen/SEP, ens_feature_svre.py, run with --num_model=15 --msvrg=15 --eps=8):
``num_models`` (15) snapshots evenly spaced through one clean run, the last included (the victim's ``snapshots``
option writes them; when ``source_model`` is empty the run is trained here from ``source_victim`` with
``source_snapshots`` snapshots); per snapshot the class-mean penultimate features of the clean set; the target
class (y + K/2) mod K; the loss the MSE between an image's features and its target centroid. Each of ``steps``
(30) outer iterations takes every snapshot's gradient at the current x + δ and their mean ḡ, then ``vr_steps``
(15) inner steps at a moving copy, each with one random snapshot j: g_sum += g_j(x_v) − (g_j(x) − ḡ),
x_v ← x_v − α·sign(g_sum); x + δ then takes the same step −α·sign(g_sum). α = 1/255, ℓ∞ ε = ``budget``/255,
no augmentation, snapshots in eval mode.

Deviation: the reference's inner loop reads the feature centroids of the *last* outer snapshot for every inner
step (``fs[j]`` with a stale j); we use those of the snapshot drawn, as its text describes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from uedist.checkpoint import load_weights
from uedist.config import ConfigError, require
from uedist.data.manifest import load_manifest
from uedist.engine.attacks.base import AttackConfig, attack_summary, batch_gen, class_sums, finish_attack
from uedist.engine.attacks.source import SOURCE_SMOKE, SourceSpec, features_and_logits, source_model
from uedist.ops.budget import Budget
from uedist.ops.pgd import signed_step
from uedist.precision import amp_args, use_channels_last
from uedist.registry import stage


@dataclass
class SEPConfig(AttackConfig, SourceSpec):
    budget: float = 8.0  # ℓ∞ ε, /255 (reference run: 8; its paper also 2)
    step_size: float = 1.0  # α, /255 (reference 1)
    steps: int = 30  # outer iterations (reference --epoch 30)
    vr_steps: int = 15  # inner variance-reduced steps (reference --msvrg 15)
    num_models: int = 15  # snapshots in the ensemble (reference --num_model 15)
    source_snapshots: int = 30  # snapshots the source run keeps when it is trained here (>= num_models)

    def validate(self) -> None:
        super().validate()
        require(0 < self.budget <= 64 and self.budget == int(self.budget), "budget: a whole number in (0, 64] /255")
        require(self.steps >= 1 and self.vr_steps >= 0 and self.num_models >= 1, "steps, num_models >= 1")
        require(self.source_snapshots >= self.num_models, "source_snapshots must be >= num_models")


def pick_snapshots(files: List[Path], n: int) -> List[Path]:
    """``n`` of the run's snapshots, evenly spaced and ending at the last (as the reference's stride)."""
    if len(files) < n:
        raise ConfigError(f"sep: the source run has {len(files)} snapshots, num_models={n} needs that many")
    return [files[round((i + 1) * len(files) / n) - 1] for i in range(n)]


def _ensemble(cfg: SEPConfig, accelerator: Any, run_dir: Path, *, m: Any) -> Dict[str, Any]:
    from uedist.engine.train.victim import list_snapshots

    base, info = source_model(cfg, accelerator, run_dir, m=m, extra=[f"snapshots={cfg.source_snapshots}"])
    files = pick_snapshots(list_snapshots(Path(info["run"])), cfg.num_models)
    models = []
    for f in files:
        net = copy.deepcopy(base)
        net.load_state_dict(load_weights(f)["model"])
        models.append(net.eval())
    return {"models": models, "files": [str(f) for f in files], "info": info}


def centroids(cfg: SEPConfig, accelerator: Any, *, models: List[torch.nn.Module], m: Any) -> List[torch.Tensor]:
    """Per snapshot the (K, D) class-mean penultimate features of the clean set (one statistics pass each)."""
    out = []
    for net in models:
        feats, n = class_sums(
            Path(cfg.data.train),
            lambda x, y, net=net: (features_and_logits(net, x)[0],),
            accelerator=accelerator,
            num_classes=m.num_classes,
            batch_size=cfg.final_batch_size,
            workers=cfg.data.workers,
        )
        out.append((feats / n.clamp_min(1)[:, None]).float())
    return out


def sep_delta(cfg: SEPConfig, *, models: List[torch.nn.Module], cents: List[torch.Tensor], num_classes: int) -> Any:
    eps, alpha = cfg.budget / 255, cfg.step_size / 255
    device = next(models[0].parameters()).device
    amp, cl = amp_args(cfg.bf16, device), use_channels_last(cfg.channels_last, device)

    def grad(j: int, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_(True)
        with torch.autocast(**amp):  # bf16 autocast for the forward when cfg.bf16; the loss in fp32
            f, _ = features_and_logits(models[j], z.contiguous(memory_format=torch.channels_last) if cl else z)
        f = f.float()
        loss = F.mse_loss(f, cents[j].to(f)[target])
        return torch.autograd.grad(loss, z)[0]

    def make(x: torch.Tensor, y: torch.Tensor, keys: List[str]) -> torch.Tensor:
        gen = batch_gen(cfg.seed, keys)
        target = (y + num_classes // 2) % num_classes
        xc = x.clone()
        for _ in range(cfg.steps):
            gs = [grad(j, xc, target) for j in range(len(models))]
            g_avg = sum(gs) / len(gs)
            xv, g_sum = xc.clone(), torch.zeros_like(x)
            for _ in range(cfg.vr_steps):
                j = int(torch.randint(len(models), (1,), generator=gen))
                g_sum = g_sum + grad(j, xv, target) - (gs[j] - g_avg)
                xv = signed_step(xv, g_sum, alpha=alpha, eps=eps, minimize=True, x=x, space="image")
            step = g_sum if cfg.vr_steps else g_avg
            xc = signed_step(xc, step, alpha=alpha, eps=eps, minimize=True, x=x, space="image")
        return (xc - x).detach()

    return make


@stage(
    "sep",
    kind="attack",
    schema=SEPConfig,
    inputs=("data.train", "data.test"),
    output="poisoned",
    summary=attack_summary,
    smoke=(
        "num_models=2",
        "steps=1",
        "vr_steps=1",
        "source_snapshots=2",
        "data.workers=0",
        *SOURCE_SMOKE,
    ),
    budget=("linf", "budget"),
)
def generate_sep(cfg: SEPConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """SEP-FA-VR: feature alignment to a wrong class over a checkpoint ensemble of one clean run; ℓ∞ ``budget``."""
    m = load_manifest(cfg.data.train)
    t0 = time.time()
    ens = _ensemble(cfg, accelerator, run_dir, m=m)
    t1 = time.time()
    cents = centroids(cfg, accelerator, models=ens["models"], m=m)
    t2 = time.time()
    for net in ens["models"]:
        for p in net.parameters():
            p.requires_grad_(False)
    make = sep_delta(cfg, models=ens["models"], cents=cents, num_classes=m.num_classes)
    extra = {"source": ens["info"], "snapshots": ens["files"], "target": "(y + K/2) mod K", "steps": cfg.steps}
    return finish_attack(
        cfg,
        accelerator,
        run_dir,
        make_delta=make,
        budget=Budget("linf", cfg.budget),
        extra=extra,
        timings={"source_model_s": t1 - t0, "centroids_s": t2 - t1},
        summary={"source": ens["info"]},
    )
