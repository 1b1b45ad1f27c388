"""``uedist shards inspect``: a text summary of a shard set and a PNG grid of samples per class."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from uedist.data.grids import write_image_grid
from uedist.data.images import decode_image
from uedist.data.manifest import Manifest, load_manifest
from uedist.data.shards import read_shard

PathLike = Union[str, os.PathLike]


def summarize(m: Manifest, folder: PathLike) -> str:
    """Human-readable summary: dataset, size, encoding, classes with counts, provenance."""
    total_bytes = sum(s.bytes for s in m.shards)
    names = m.extra.get("class_names") or m.classes
    lines = [
        f"shard set   {folder}",
        f"dataset     {m.dataset} / {m.split}",
        f"samples     {m.num_samples} in {len(m.shards)} shards ({total_bytes / 2**20:.1f} MiB)",
        f"images      {m.image_size[0]}x{m.image_size[1]} RGB, {m.encoding}{' (lossless)' if m.lossless else ''}",
        f"classes     {m.num_classes}",
    ]
    if m.class_counts:
        c = np.asarray(m.class_counts)
        lines.append(f"per class   min {c.min()}  max {c.max()}  mean {c.mean():.1f}")
        shown = [f"{i}:{names[i]}={m.class_counts[i]}" for i in range(min(len(names), 12))]
        lines.append("            " + "  ".join(shown) + ("  …" if len(names) > 12 else ""))
    if m.skipped:
        lines.append(
            f"skipped     {len(m.skipped)} input file(s) (see manifest 'skipped'), e.g. {m.skipped[0].get('ref')}"
        )
    p = m.provenance
    if p:
        lines.append(f"provenance  stage={p.get('stage')} code={p.get('code_version')} parents={p.get('parents')}")
    return "\n".join(lines)


def default_grid_path(folder: PathLike, root: PathLike = "runs/inspect") -> Path:
    """Where ``uedist shards inspect`` draws a set by default: ``runs/inspect/<parent>_<set>/samples.png`` (e.g.
    ``runs/inspect/cifar10_train``), never inside the set itself (a data set's folder holds its shards and
    manifest only, and may be read-only or shared)."""
    folder = Path(folder).resolve()
    return Path(root) / f"{folder.parent.name}_{folder.name}" / "samples.png"


def sample_grid(
    folder: PathLike, *, per_class: int = 8, max_classes: int = 20, thumb: int = 64, out: Optional[PathLike] = None
) -> Path:
    """Write a PNG grid: one row per class (first ``max_classes``), ``per_class`` samples each, labelled, to
    ``out`` (default :func:`default_grid_path`)."""
    folder = Path(folder)
    m = load_manifest(folder)
    n_cls = min(m.num_classes, max_classes)
    picked: Dict[int, List[np.ndarray]] = {c: [] for c in range(n_cls)}
    for info in m.shards:
        for s in read_shard(folder, info):
            if s.label < n_cls and len(picked[s.label]) < per_class:
                picked[s.label].append(decode_image(s.data, s.ext, m.image_size, name=f"{info.name}:{s.key}"))
        if all(len(v) >= per_class or (m.class_counts and len(v) >= m.class_counts[c]) for c, v in picked.items()):
            break
    names = m.extra.get("class_names") or m.classes
    out_path = Path(out) if out else default_grid_path(folder)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = [picked[c] for c in range(n_cls)]
    labels = [f"{c}: {str(names[c])[:14]}" for c in range(n_cls)]
    write_image_grid(rows, out_path, row_labels=labels, thumb=thumb, label_width=110)
    return out_path
