"""LSP: linearly separable synthetic perturbations (Yu et al., KDD 2022, "Availability attacks create shortcuts";
SEM's "SC"). No model: class-wise Gaussian clusters in a low-dimensional patch space, upsampled to the image.

    accelerate launch launch/attack.py --config configs/lsp/cifar10.yaml [l2=4.0]

The reference (github.com/dayu11/Availability-Attacks-Create-Shortcuts, synthetic_perturbations/, and APBench's
attack/lsp_poisons.py) draws ``sklearn.make_classification`` points with one cluster per class (class_sep 10, as
many informative features as there are patch cells: (size / patch)² × 3), gives each image of class k one point
of cluster k, repeats each feature over a patch × patch square (8 px at 32 px, 32 px at 224) and scales each
image's δ to a fixed ℓ2 norm. Ours draws the same distribution without sklearn: cluster k's centroid is a vertex
of the hypercube [−class_sep, class_sep]^d (distinct vertices, seeded), its covariance a seeded random linear map
A_k with entries U(−1, 1) (as make_classification does), and each image's point is seeded by its key, so the
noise of a sample never depends on the batch it lands in. Budget: ℓ2 ``l2`` per image in [0, 1] units (D-VAE
Table 2: 1.0; Table 5: 4.0); the reference's own scale is 6/255·√(H·W·3) (1.30 at 32 px).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch

from uedist.config import require
from uedist.data.manifest import load_manifest
from uedist.engine.attacks.base import AttackConfig, attack_summary, finish_attack, key_gen
from uedist.ops.budget import Budget
from uedist.registry import stage


@dataclass
class LSPConfig(AttackConfig):
    l2: float = 1.0  # ‖δ‖₂ per image, [0, 1] units
    patch_size: int = 8  # px per synthetic feature cell (reference: 8 at 32 px, 32 at 224 px)
    class_sep: float = 10.0  # make_classification's class_sep (reference: 10)

    def validate(self) -> None:
        super().validate()
        require(self.l2 > 0, f"l2 must be > 0, got {self.l2}")
        require(self.patch_size >= 1 and self.class_sep > 0, "patch_size >= 1 and class_sep > 0")


def cluster_params(*, num_classes: int, dim: int, class_sep: float, seed: int) -> Dict[str, torch.Tensor]:
    """Centroids (K, d) on distinct hypercube vertices and per-class linear maps (K, d, d), seeded."""
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    if dim < 63 and num_classes > 2**dim:
        raise ValueError(f"LSP: {num_classes} classes need more than {dim} features (use a smaller patch_size)")
    verts: List[torch.Tensor] = []
    seen = set()
    while len(verts) < num_classes:
        v = torch.randint(0, 2, (dim,), generator=g)
        t = tuple(v.tolist())
        if t not in seen:
            seen.add(t)
            verts.append(v)
    centroids = (torch.stack(verts).double() * 2 - 1) * class_sep
    maps = torch.rand((num_classes, dim, dim), generator=g, dtype=torch.float64) * 2 - 1
    return {"centroids": centroids, "maps": maps}


def lsp_delta(cfg: LSPConfig, *, num_classes: int, size: tuple) -> Any:
    h, w = size
    cells = (-(-h // cfg.patch_size), -(-w // cfg.patch_size))  # ceil, as the reference's num_patch
    dim = cells[0] * cells[1] * 3
    params = cluster_params(num_classes=num_classes, dim=dim, class_sep=cfg.class_sep, seed=cfg.seed)

    def make(x: torch.Tensor, y: torch.Tensor, keys: List[str]) -> torch.Tensor:
        z = torch.stack([torch.randn(dim, generator=key_gen(cfg.seed, k), dtype=torch.float64) for k in keys])
        yc = y.cpu()
        pts = params["centroids"][yc] + torch.einsum("bd,bde->be", z, params["maps"][yc])  # (B, d)
        grid = pts.view(-1, cells[0], cells[1], 3).permute(0, 3, 1, 2)  # (B, 3, cells, cells), reference layout
        img = grid.repeat_interleave(cfg.patch_size, 2).repeat_interleave(cfg.patch_size, 3)[:, :, :h, :w]
        img = img * (cfg.l2 / img.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1)
        return img.to(x)

    return make


@stage(
    "lsp",
    kind="attack",
    schema=LSPConfig,
    inputs=("data.train",),
    output="poisoned",
    summary=attack_summary,
    smoke=("patch_size=4", "data.workers=0"),
    budget=("l2", "l2"),
)
def generate_lsp(cfg: LSPConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """LSP: class-wise synthetic patch noise at ℓ2 ``l2`` per image (no model); writes the poisoned set."""
    m = load_manifest(cfg.data.train)
    make = lsp_delta(cfg, num_classes=m.num_classes, size=tuple(m.image_size))
    extra = {"patch_size": cfg.patch_size, "class_sep": cfg.class_sep}
    return finish_attack(cfg, accelerator, run_dir, make_delta=make, budget=Budget("l2", cfg.l2), extra=extra)
