"""What every data source provides, and the folder scanning they share.

A source is a picklable description of one split of one dataset: its classes (label order), canonical image
size, and a deterministic list of items (a reference + a label). ``read(item)`` returns the item's image as
encoded bytes (decoded and converted by the shard builder) or as a uint8 (H, W, 3) array.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from uedist.data.images import ResizeMode

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


class SourceError(ValueError):
    """A source folder or file that does not match the dataset's layout; the message names it."""


@dataclass(frozen=True)
class Item:
    ref: str  # a path relative to the source root, or another stable reference ("data_batch_1#17")
    label: int


class Source:
    """Base class. Subclasses set the attributes in ``__init__`` and implement ``items`` and ``read``."""

    name: str  # dataset name written to the manifest
    split: str
    classes: List[str]
    image_size: Tuple[int, int]
    resize_mode: ResizeMode = "center_crop"
    default_encoding: str = "png"
    root: Path

    def items(self) -> List[Item]:
        raise NotImplementedError

    def read(self, item: Item) -> Union[bytes, np.ndarray]:
        return (self.root / item.ref).read_bytes()

    def origin(self) -> str:
        """Where the data came from, for the manifest's provenance ``parents``."""
        return str(self.root.resolve())

    def describe(self) -> Dict[str, object]:
        """Facts for the manifest's ``extra`` (e.g. excluded folders, protocol parameters)."""
        return {}


def is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS


def list_images(folder: Path) -> List[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files and non-images ignored)."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def class_folders(root: Path) -> List[Path]:
    """Sub-folders of ``root`` sorted by name (hidden ones ignored)."""
    if not root.is_dir():
        raise SourceError(f"folder not found: {root}")
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def scan_class_folders(
    root: Path, labels: Dict[str, int], *, allow_empty: bool = False, rel_to: Path, follow_symlinks: bool = False
) -> List[Item]:
    """Items for every image in ``root/<class>/`` for the class folders named in ``labels``.

    An empty class folder is an error naming it (a class with no samples silently changes results), unless
    ``allow_empty``. An image (or a class folder) that is a symlink leading out of ``rel_to`` is refused naming
    it, unless ``follow_symlinks``: then the item records the resolved path, so the manifest says where the
    pixels came from. Symlinks that stay inside ``rel_to`` are fine.
    """
    items: List[Item] = []
    top = Path(rel_to).resolve()
    for name, label in sorted(labels.items(), key=lambda kv: (kv[1], kv[0])):
        folder = root / name
        files = list_images(folder)
        if not files and not allow_empty:
            raise SourceError(f"class folder {folder} holds no images (set allow_empty_classes=true to accept)")
        for f in files:
            real = Path(f).resolve()
            if real.is_relative_to(top):
                items.append(Item(os.path.relpath(f, rel_to), label))
            elif follow_symlinks:
                items.append(Item(str(real), label))
            else:
                raise SourceError(
                    f"{f}: leads out of {rel_to} (a symlink to {real}); set follow_symlinks=true to accept it "
                    "(the manifest then records the resolved path)"
                )
    return items


def check_num_classes(found: Sequence[str], expected: int, where: Path) -> None:
    if expected and len(found) != expected:
        raise SourceError(
            f"{where}: found {len(found)} class folders, the config expects {expected} "
            f"(found: {', '.join(found[:12])}{'…' if len(found) > 12 else ''})"
        )
