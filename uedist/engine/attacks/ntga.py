"""NTGA: neural tangent generalization attack (Yuan & Wu, ICML 2021). No trained model: the closed-form
infinite-width network (:mod:`uedist.ops.ntk`), block-wise over the training set.

    accelerate launch launch/attack.py --config configs/ntga/cifar10.yaml

Each block of ``final_batch_size`` training samples (the map pass's batch, keys in order; reference block 512)
is perturbed to *raise* the cross-entropy, on a clean target set, of the infinite-width network trained on the
block by gradient flow on the MSE for time t (``gd_mse_predict``, neural-tangents' ``gradient_descent_mse``).
The reference (github.com/lionelmessi6410/ntga and APBench's attack/ntga_poisons.py: t = 64, diag_reg 1e-4,
σ_w² 1.76, σ_b² 0.18, float64, images in [0, 1] as they are, the ``cnn`` surrogate) is followed by default:

- ``arch: cnn``: the reference's CNN kernel (two 5×5 stride-2 conv + ReLU blocks, Flatten, Dense 384 → 192 →
  readout; stride 3 for ImageNet). ``arch: fc`` is a fully connected kernel (``depth`` hidden layers,
  ``activation``; the reference's ``fnn`` is depth 5 with erf).
- ``rule: reference``: what the reference code computes. Its ``projected_gradient_descent`` calls
  ``fast_gradient_method`` on the *clean* block with step ε at each of its 10 iterations, so every iteration
  gives the same point and the result is one signed step of the whole budget, δ = ε·sign(∇ₓ L) at the clean
  block (clipped to [0, 1]). ``rule: pgd`` is the iterated PGD the paper describes (``steps`` signed steps of
  1.1·ε/steps from the clean block, projected each step).
- inputs to the kernel are the [0, 1] images (the reference's ``x / 255``); ``standardize: true`` standardizes
  them per channel with the dataset's mean/std first (our earlier form).

Deviations: the target set is ``target`` (default ``data.test``, as APBench does; the paper uses a held-out
validation split of the training set — pass one), its first ``target_size`` samples in key order; the reference
sums its gradient over target batches of 30 and drops the remainder (9,990 of 10,000), we take the mean over
all of them (the same sign but for that remainder).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Tuple

import torch
import torch.nn.functional as F

from uedist.config import require, runtime
from uedist.data.loaders import make_map_loader
from uedist.data.manifest import load_manifest
from uedist.dist import get_logger
from uedist.engine.attacks.base import AttackConfig, attack_summary, finish_attack
from uedist.ops.budget import Budget
from uedist.ops.images import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, to_unit
from uedist.ops.ntk import CNNKernel, FCKernel, Kernel, gd_mse_predict
from uedist.ops.pgd import signed_step
from uedist.registry import stage

log = get_logger(__name__)


@dataclass
class NTGAConfig(AttackConfig):
    budget: float = 8.0  # ℓ∞ ε, /255
    rule: Literal["reference", "pgd"] = "reference"  # reference: one step of ε at the clean block (see above)
    steps: int = 10  # rule pgd: signed steps of 1.1·ε/steps (the paper's nb_iter 10)
    t: float = 64.0  # gradient-flow time of the infinite-width network (reference 64)
    diag_reg: float = 1.0e-4
    arch: Literal["cnn", "fc"] = "cnn"  # the reference's cnn surrogate, or a fully connected kernel
    conv_layers: int = 2  # cnn: conv + activation blocks
    filter_size: int = 5  # cnn
    stride: int = 2  # cnn: 2 (CIFAR), 3 (the reference's ImageNet)
    dense_layers: int = 2  # cnn: linear dense layers before the readout (reference 384, 192)
    depth: int = 3  # fc: hidden layers
    w_std2: float = 1.76
    b_std2: float = 0.18
    activation: Literal["relu", "erf"] = "relu"
    kernel: Literal["ntk", "nngp"] = "ntk"
    standardize: bool = False  # the reference feeds [0, 1] images to the kernel
    target: str = ""  # clean target shard set; empty: data.test
    target_size: int = 10000  # its first N samples (reference: the 10,000 CIFAR-10 test images)
    float64: bool = True  # the reference runs JAX in x64
    block_entries: int = runtime(1 << 22)  # cnn: positions × pairs per kernel block (memory, not results)

    def validate(self) -> None:
        super().validate()
        require(0 < self.budget <= 64 and self.budget == int(self.budget), "budget: a whole number in (0, 64] /255")
        require(self.steps >= 1 and self.t > 0 and self.depth >= 1 and self.target_size >= 1, "steps, t, depth >= 1")
        require(
            self.conv_layers >= 1 and self.filter_size >= 1 and self.stride >= 1,
            "conv_layers, filter_size, stride >= 1",
        )
        require(self.dense_layers >= 0 and self.block_entries >= 1, "dense_layers >= 0, block_entries >= 1")

    def make_kernel(self) -> Kernel:
        if self.arch == "fc":
            return FCKernel(self.depth, self.w_std2, self.b_std2, self.activation, self.kernel)
        return CNNKernel(
            self.conv_layers,
            self.filter_size,
            self.stride,
            self.dense_layers,
            self.w_std2,
            self.b_std2,
            self.activation,
            self.kernel,
            self.block_entries,
        )

    def describe_kernel(self) -> str:
        if self.arch == "fc":
            return f"FC {self.kernel} depth {self.depth} {self.activation}"
        return (
            f"CNN {self.kernel}: {self.conv_layers} × conv {self.filter_size}×{self.filter_size}/{self.stride} "
            f"{self.activation}, flatten, {self.dense_layers} linear dense + readout"
        )


def load_target(folder: Path, *, n: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of a shard set in key order: ([0, 1] images (n, C, H, W), labels (n,))."""
    xs, ys, have = [], [], 0
    for batch in make_map_loader(folder, batch_size=256):
        if not batch["key"]:
            continue
        xs.append(to_unit(batch["image"]))
        ys.append(batch["label"])
        have += len(batch["key"])
        if have >= n:
            break
    return torch.cat(xs)[:n].to(device), torch.cat(ys)[:n].to(device)


def ntga_block(
    kernel: Kernel,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    target: Tuple[torch.Tensor, torch.Tensor],
    cfg: NTGAConfig,
    num_classes: int,
    standardize: Callable[[torch.Tensor], torch.Tensor] = lambda z: z,
) -> torch.Tensor:
    """δ for one block x (B, C, H, W) in [0, 1] with labels y; ``target`` = (images, labels) of the clean target set.
    ``rule`` reference: ε·sign(∇) at the clean block; pgd: ``steps`` projected signed steps of 1.1·ε/steps."""
    dtype = torch.float64 if cfg.float64 else torch.float32
    y_train = F.one_hot(y, num_classes).to(dtype)
    xt = standardize(target[0].to(dtype))
    yt = target[1]
    eps = cfg.budget / 255
    steps, alpha = (1, eps) if cfg.rule == "reference" else (cfg.steps, 1.1 * eps / cfg.steps)
    out_dtype, x = x.dtype, x.to(dtype)
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        xb = standardize(x + delta)
        f = gd_mse_predict(kernel(xb, xb), kernel(xt, xb), y_train, t=cfg.t, diag_reg=cfg.diag_reg)
        loss = F.cross_entropy(f, yt)
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = signed_step(delta, g, alpha=alpha, eps=eps, x=x)
    return delta.detach().to(out_dtype)


@stage(
    "ntga",
    kind="attack",
    schema=NTGAConfig,
    inputs=("data.train", "data.test"),
    output="poisoned",
    summary=attack_summary,
    smoke=("final_batch_size=40", "target_size=40", "steps=2", "data.workers=0"),
    budget=("linf", "budget"),
)
def generate_ntga(cfg: NTGAConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """NTGA: per block, signed steps raising the infinite-width network's target loss; ℓ∞ ``budget``."""
    m = load_manifest(cfg.data.train)
    target_set = Path(cfg.target or cfg.data.test)
    require(bool(cfg.target or cfg.data.test), "ntga needs a clean target set: target=... or data.test=...")
    m.check_compatible(load_manifest(target_set), what=f"ntga: data.train {cfg.data.train} vs target {target_set}: ")
    t0 = time.time()
    target = load_target(target_set, n=cfg.target_size, device=accelerator.device)
    load_s = time.time() - t0
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if m.dataset.startswith("cifar") else (IMAGENET_MEAN, IMAGENET_STD)
    mu = torch.tensor(mean, device=accelerator.device).view(1, -1, 1, 1)
    sd = torch.tensor(std, device=accelerator.device).view(1, -1, 1, 1)
    kernel = cfg.make_kernel()
    largest = max(s.count for s in m.shards)
    if cfg.final_batch_size > largest:
        log.warning(
            "ntga: blocks are cut at shard boundaries: final_batch_size=%d, but the largest shard of %s holds %d "
            "(rebuild the set with shard_size >= %d for full blocks)",
            cfg.final_batch_size, cfg.data.train, largest, cfg.final_batch_size,
        )  # fmt: skip

    def make(x: torch.Tensor, y: torch.Tensor, keys: List[str]) -> torch.Tensor:
        return ntga_block(
            kernel,
            x,
            y,
            target=target,
            cfg=cfg,
            num_classes=m.num_classes,
            standardize=(lambda z: (z - mu.to(z)) / sd.to(z)) if cfg.standardize else (lambda z: z),
        )

    extra = {
        "kernel": cfg.describe_kernel(),
        "rule": cfg.rule,
        # the map pass's batches never cross a shard: the block is at most the largest shard (said, not hidden)
        "block": min(cfg.final_batch_size, max(s.count for s in m.shards)),
        "block_requested": cfg.final_batch_size,
        "target": str(target_set),
        "target_size": int(target[1].numel()),
    }
    return finish_attack(
        cfg,
        accelerator,
        run_dir,
        make_delta=make,
        budget=Budget("linf", cfg.budget),
        extra=extra,
        timings={"target_load_s": load_s},
    )
