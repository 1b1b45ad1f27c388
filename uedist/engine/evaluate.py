"""Clean test accuracy over a shard set, split across ranks by shard: every test sample is counted exactly once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from uedist.data.loaders import make_map_loader
from uedist.data.manifest import ManifestError, load_manifest
from uedist.ops.images import to_unit


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    folder: Path,
    *,
    accelerator: Any,
    batch_size: int = 256,
    num_workers: int = 2,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    bf16: bool = False,
    channels_last: bool = False,
) -> Dict[str, Any]:
    """Top-1 / top-5 / per-class accuracy (%) of ``model`` (takes [0, 1] images) on the shard set ``folder``.

    Call on every rank with the *unwrapped* model (evaluating through the DDP wrapper would sync BatchNorm
    buffers from rank 0 mid-pass); the counts are summed across ranks."""
    m = load_manifest(folder)
    if m.num_samples == 0:
        raise ManifestError(f"{folder}: the test set has no samples, so no accuracy can be measured on it")
    device = accelerator.device
    was_training = model.training
    model.eval()
    k = min(5, m.num_classes)
    correct1 = torch.zeros(m.num_classes, dtype=torch.float64, device=device)
    total = torch.zeros(m.num_classes, dtype=torch.float64, device=device)
    correct5 = torch.zeros((), dtype=torch.float64, device=device)
    loader = make_map_loader(
        folder,
        batch_size=batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=num_workers,
    )
    for batch in loader:
        if not batch["key"]:
            continue
        x = to_unit(batch["image"].to(device, non_blocking=True))
        if transform is not None:
            x = transform(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).float()
        top = logits.topk(k, dim=1).indices
        hit1 = (top[:, 0] == y).double()
        correct1.index_add_(0, y, hit1)
        total.index_add_(0, y, torch.ones_like(hit1))
        correct5 += (top == y[:, None]).any(1).double().sum()
    stats = accelerator.reduce(torch.cat([correct1, total, correct5[None]]), reduction="sum")
    c1, tot, c5 = stats[: m.num_classes], stats[m.num_classes : 2 * m.num_classes], stats[-1]
    model.train(was_training)
    n = float(tot.sum())
    per_class = torch.where(tot > 0, 100.0 * c1 / tot.clamp_min(1), torch.full_like(tot, float("nan")))
    return {
        "top1": 100.0 * float(c1.sum()) / max(n, 1.0),
        "top5": 100.0 * float(c5) / max(n, 1.0),
        "per_class": [round(float(v), 4) for v in per_class],
        "samples": int(n),
        "expected_samples": m.num_samples,
    }
