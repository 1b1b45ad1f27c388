"""The error-minimizing family's shared part (SEM, REM, EM): the config fields of a surrogate trained against the
noise, the surrogate itself, the EOT augmentation, and loading / scoring the trained surrogate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Literal, Optional, Tuple

import torch

from uedist.config import Cadence, location, require, runtime
from uedist.data.ffcv_io import DataFormat
from uedist.data.manifest import Manifest
from uedist.engine.attacks.base import AttackConfig, AttackData
from uedist.engine.evaluate import evaluate
from uedist.engine.train.loop import OptimConfig
from uedist.engine.train.victim import ModelSpec
from uedist.models.wrappers import Normalized
from uedist.ops import augment
from uedist.ops.images import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from uedist.precision import use_bf16
from uedist.registry import MODELS


@dataclass
class SurrogateData(DataFormat, AttackData):
    """The ``data`` section of the surrogate family: the attacks' (:class:`AttackData`), plus what feeds the
    surrogate's training steps (``format``: the shard stream or an FFCV beton of ``train``; ``beton``)."""


@dataclass
class SurrogateConfig(Cadence, AttackConfig):
    """The papers' settings, in /255 units, that SEM, REM and EM share. Defaults: the CIFAR-10 SEM reference.
    The surrogate trains on the step loop, so these attacks also have the checkpoint / log cadence."""

    name: str = location("sem")  # redeclared for its default: the run's folder is named after the stage
    data: SurrogateData = field(default_factory=SurrogateData)  # redeclared: + format, beton (runtime)
    budget: float = 8.0  # ρ_u: the noise's ℓ∞ limit, /255
    noise_steps: int = 10  # K_u
    noise_step_size: float = 1.6  # α_u
    augment: Literal["auto", "crop_flip", "rrc_flip", "none"] = "auto"  # EOT: crop+flip <= 64 px, else RRC+flip
    crop_pad: int = 4
    train_size: int = 0  # RRC output size; 0 = 7/8 of the stored size (224 for 256)
    steps: int = 5000  # M surrogate steps
    surrogate: ModelSpec = field(default_factory=lambda: ModelSpec(stem="cifar"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(schedule="step", milestones=[0.4, 0.8]))
    # bf16 / channels_last are redeclared for their default, auto (null) instead of off: the surrogate family's
    # training and inner loops are where bf16 pays
    bf16: Optional[bool] = None  # null = auto: on where the device runs bf16 natively (uedist.precision)
    channels_last: Optional[bool] = None  # null = auto: on with native bf16
    compile: bool = False  # torch.compile the surrogate's forward in the noise, PGD and training loops
    fold_bn: bool = True  # inner loops: eval-mode BatchNorm folded into the convolutions (same function; ours)
    # The REM/SEM reference's surrogate sees x − 0.5 (std 1) and trains on δ rounded to /255; ours
    # normalizes with the dataset's mean/std and trains on the unrounded δ. Both are options; ours is the default.
    # Measured on the CIFAR-10 sample (configs/sem/cifar10_cpu.yaml, victim at the defaults, clean 70.28 %): ours
    # 25.67 %, the reference's (surrogate_input=half train_on_rounded=true) 27.86 %: one seed each (docs/noise.md).
    surrogate_input: Literal["dataset", "half"] = "dataset"
    train_on_rounded: bool = False
    inner_batch: int = runtime(0)  # images per forward in the inner loops (0: all on a GPU, measured on a CPU)

    def validate(self) -> None:
        super().validate()
        require(0 < self.budget <= 64, f"budget must be in (0, 64] (/255), got {self.budget}")
        require(self.budget == int(self.budget), f"budget must be a whole number of /255 levels, got {self.budget}")
        require(self.noise_steps >= 1 and self.noise_step_size > 0, "noise_steps >= 1 and noise_step_size > 0")
        require(self.inner_batch >= 0, f"inner_batch must be >= 0 (0 = the device's default), got {self.inner_batch}")
        require(self.steps >= 0 and self.data.batch_size >= 1, "steps >= 0, data.batch_size >= 1")


def surrogate_for(cfg: SurrogateConfig, m: Manifest) -> Normalized:
    stem = cfg.surrogate.stem if cfg.surrogate.stem != "auto" else ("cifar" if max(m.image_size) <= 64 else "imagenet")
    net = MODELS.build(cfg.surrogate.name, num_classes=m.num_classes, stem=stem, width=cfg.surrogate.width)
    if cfg.surrogate_input == "half":  # the REM/SEM reference: x − 0.5, std 1
        return Normalized(net, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0))
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if m.dataset.startswith("cifar") else (IMAGENET_MEAN, IMAGENET_STD)
    return Normalized(net, mean, std)


def make_eot(cfg: SurrogateConfig, m: Manifest, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """One random augmentation per image, batched and differentiable (crop+flip at 32 px, RRC 224 + flip at 256)."""
    size = max(m.image_size)
    mode = cfg.augment if cfg.augment != "auto" else ("crop_flip" if size <= 64 else "rrc_flip")
    out = cfg.train_size or round(size * 7 / 8)
    if mode == "crop_flip":
        return lambda z: augment.random_crop_flip(z, pad=cfg.crop_pad, gen=gen)
    if mode == "rrc_flip":
        return lambda z: augment.random_resized_crop_flip(z, out, gen=gen)
    return lambda z: z


def eot_size(cfg: SurrogateConfig, hw: Any) -> Tuple[int, int]:
    """(H, W) of an EOT-augmented image of a stored (H, W): RRC's output size, else unchanged."""
    size = max(int(hw[0]), int(hw[1]))
    mode = cfg.augment if cfg.augment != "auto" else ("crop_flip" if size <= 64 else "rrc_flip")
    if mode == "rrc_flip":
        out = cfg.train_size or round(size * 7 / 8)
        return out, out
    return int(hw[0]), int(hw[1])


def set_grad(model: torch.nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


def load_surrogate(cfg: SurrogateConfig, run_dir: Path, *, m: Manifest, device: torch.device) -> Normalized:
    from uedist.checkpoint import latest_checkpoint, load_state

    model = surrogate_for(cfg, m).to(device)
    path = latest_checkpoint(run_dir / "surrogate" / "checkpoints")
    if path is not None:
        model.load_state_dict(load_state(path)["model"])
    elif cfg.steps > 0:
        raise FileNotFoundError(f"no surrogate checkpoint under {run_dir / 'surrogate'}: run phase 1 first")
    return model.eval()


def surrogate_eval(cfg: SurrogateConfig, model: Normalized, *, poisoned: Path, accelerator: Any) -> Dict[str, float]:
    """The frozen surrogate's accuracy on the poisoned train set (and on the clean test set, when given)."""
    res = {
        "surrogate_acc_poisoned": evaluate(
            model,
            poisoned,
            accelerator=accelerator,
            batch_size=cfg.final_batch_size,
            num_workers=cfg.data.workers,
            bf16=use_bf16(cfg.bf16, accelerator.device),
        )["top1"]
    }
    if cfg.data.test:
        res["surrogate_acc_clean_test"] = evaluate(
            model,
            Path(cfg.data.test),
            accelerator=accelerator,
            batch_size=cfg.final_batch_size,
            num_workers=cfg.data.workers,
            bf16=use_bf16(cfg.bf16, accelerator.device),
        )["top1"]
    return res
