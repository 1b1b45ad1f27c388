"""The one PNG image-grid writer: uint8 tiles laid out in rows, optional column titles and row labels."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from uedist.io import atomic_write

PathLike = Union[str, os.PathLike]


def write_image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    out: PathLike,
    *,
    titles: Optional[Sequence[str]] = None,
    row_labels: Optional[Sequence[str]] = None,
    thumb: int = 0,
    pad: int = 2,
    label_width: int = 110,
) -> Path:
    """Write a PNG grid atomically; returns ``out``.

    ``rows``: one entry per grid line, each a sequence (or uint8 array (N, H, W, 3)) of uint8 (H, W, 3) tiles in
    [0, 255]; lines may differ in length (white fills the rest). ``thumb`` > 0 resizes every tile to
    ``thumb`` × ``thumb`` px (nearest-neighbour up, bicubic down); 0 keeps the tiles' size (all tiles then share
    the first one's). ``titles`` label the columns (a 16 px band on top); ``row_labels`` the lines (a band of
    ``label_width`` px on the left)."""
    first = next(t for r in rows for t in r)
    th, tw = (thumb, thumb) if thumb else first.shape[:2]
    ncols = max([len(r) for r in rows] + [len(titles or ())])
    top = 16 if titles else 0
    left = label_width if row_labels else 0
    h = max(th, 16) if row_labels else th
    grid = Image.new("RGB", (left + ncols * (tw + pad) + pad, top + len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(titles or ()):
        draw.text((left + pad + j * (tw + pad), 2), title[: tw // 6 + 2], fill=(0, 0, 0))
    for i, row in enumerate(rows):
        y = top + pad + i * (h + pad)
        if row_labels:
            draw.text((4, y + h // 2 - 6), row_labels[i], fill=(0, 0, 0))
        for j, arr in enumerate(row):
            tile = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
            if thumb and tile.size != (thumb, thumb):
                tile = tile.resize((thumb, thumb), Image.NEAREST if arr.shape[0] < thumb else Image.BICUBIC)
            grid.paste(tile, (left + pad + j * (tw + pad), y))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return atomic_write(out, lambda f: f.write(buf.getvalue()))
