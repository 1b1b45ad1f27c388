"""ImageNet-100: the first N (100) classes of ImageNet-1k in sorted synset order, from an ImageFolder tree.

Layout: ``root/train/<synset>/*.JPEG``; ``root/val/`` either the same synset folders or flat files with a
label file (``val_labels``): lines ``<file name> <synset or class index>`` (whitespace or comma separated), or
Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString`` whose first word is the synset).

The label of a synset is its index among the 1000 sorted ImageNet-1k synsets (shipped with uedist), whatever
subset of folders is present; synsets at index >= num_classes are left out (and counted); a folder that is no
ImageNet-1k synset is an error naming it (or left out with ``unknown_synsets: skip``). Canonical size 256×256:
shorter side to 256, centre crop (the reference REM/SEM pipelines then random-resized-crop 224 at train time).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

from uedist.config import require
from uedist.data.images import ResizeMode
from uedist.data.sources.base import Item, Source, SourceError, class_folders, is_image_file, list_images
from uedist.registry import SOURCES

_META = Path(__file__).resolve().parents[1] / "meta"


@lru_cache(maxsize=1)
def imagenet_synsets() -> Tuple[str, ...]:
    """The 1000 ImageNet-1k synsets in sorted order (index = class index)."""
    syn = tuple(line.strip() for line in (_META / "imagenet_synsets.txt").read_text().splitlines() if line.strip())
    assert len(syn) == 1000 and list(syn) == sorted(syn)
    return syn


@lru_cache(maxsize=1)
def synset_index() -> Dict[str, int]:
    return {s: i for i, s in enumerate(imagenet_synsets())}


@lru_cache(maxsize=1)
def imagenet_lemmas() -> Dict[str, str]:
    out = {}
    for line in (_META / "imagenet_synset_to_lemma_1k.txt").read_text().splitlines():
        if "\t" in line:
            s, lemma = line.split("\t", 1)
            out[s] = lemma.split(",")[0].strip()
    return out


@dataclass
class ImageNetConfig:
    root: str = ""  # holds train/ and val/
    num_classes: int = 100  # the first N synsets in sorted order
    size: Tuple[int, int] = (256, 256)
    resize_mode: ResizeMode = "center_crop"
    val_labels: Optional[str] = None  # label file for a flat val/ folder
    unknown_synsets: Literal["error", "skip"] = "error"
    allow_empty_classes: bool = False

    def validate(self) -> None:
        require(1 <= self.num_classes <= 1000, f"num_classes must be in 1..1000, got {self.num_classes}")


class ImageNetSource(Source):
    default_encoding = "jpg"

    def __init__(self, cfg: ImageNetConfig, split: str) -> None:
        if not cfg.root:
            raise SourceError("imagenet: no root folder configured (imagenet.root=/path/to/imagenet)")
        self.root = Path(cfg.root).expanduser()
        self.split_dir = self.root / split
        if not self.split_dir.is_dir():
            raise SourceError(f"imagenet: split folder not found: {self.split_dir}")
        self.cfg, self.split = cfg, split
        self.name = f"imagenet{cfg.num_classes}" if cfg.num_classes != 1000 else "imagenet1k"
        self.image_size, self.resize_mode = tuple(cfg.size), cfg.resize_mode
        self.classes = list(imagenet_synsets()[: cfg.num_classes])
        self.excluded: Dict[str, int] = {}  # synset -> file count, for synsets beyond num_classes
        self.unknown: List[str] = []

    def _synset_label(self, name: str, where: Path) -> Optional[int]:
        index = synset_index().get(name)
        if index is None:
            if self.cfg.unknown_synsets == "skip":
                self.unknown.append(name)
                return None
            raise SourceError(
                f"{where / name}: {name!r} is not an ImageNet-1k synset "
                "(set imagenet.unknown_synsets=skip to ignore it)"
            )
        return index if index < self.cfg.num_classes else None

    def items(self) -> List[Item]:
        folders = class_folders(self.split_dir)
        flat = [p for p in self.split_dir.iterdir() if is_image_file(p)]
        if flat and folders:
            raise SourceError(f"{self.split_dir}: holds both image files and class folders; expected one layout")
        if flat or (self.cfg.val_labels and not folders):
            return self._flat_items()
        items: List[Item] = []
        for folder in folders:
            label = self._synset_label(folder.name, self.split_dir)
            files = list_images(folder)
            if label is None:
                if folder.name in synset_index():
                    self.excluded[folder.name] = len(files)
                continue
            if not files and not self.cfg.allow_empty_classes:
                raise SourceError(
                    f"class folder {folder} holds no images (set imagenet.allow_empty_classes=true to accept)"
                )
            items += [Item(os.path.relpath(f, self.root), label) for f in files]
        if not items:
            raise SourceError(f"{self.split_dir}: no images of the first {self.cfg.num_classes} synsets found")
        return items

    def _flat_items(self) -> List[Item]:
        if not self.cfg.val_labels:
            raise SourceError(f"{self.split_dir} holds flat image files: set imagenet.val_labels to their label file")
        labels = read_val_labels(Path(self.cfg.val_labels).expanduser())
        items: List[Item] = []
        files = list_images(self.split_dir)
        unlabeled = [f.name for f in files if _stem(f.name) not in labels]
        if unlabeled:
            raise SourceError(
                f"{self.cfg.val_labels}: no label for {len(unlabeled)} file(s) in {self.split_dir}, "
                f"e.g. {unlabeled[:3]}"
            )
        for f in files:
            raw = labels[_stem(f.name)]
            syn = imagenet_synsets()[int(raw)] if raw.isdigit() else raw
            label = self._synset_label(syn, self.split_dir)
            if label is None:
                if syn in synset_index():
                    self.excluded[syn] = self.excluded.get(syn, 0) + 1
                continue
            items.append(Item(os.path.relpath(f, self.root), label))
        return items

    def describe(self) -> Dict[str, object]:
        lemmas = imagenet_lemmas()
        return {
            "class_names": [lemmas.get(s, s) for s in self.classes],
            "excluded_synsets": len(self.excluded),
            "excluded_images": sum(self.excluded.values()),
            "unknown_folders_skipped": self.unknown,
        }


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def read_val_labels(path: Path) -> Dict[str, str]:
    """Label file -> {file stem: synset or index string}. Errors name the file and line."""
    if not path.is_file():
        raise SourceError(f"val label file not found: {path}")
    out: Dict[str, str] = {}
    with path.open(newline="") as f:
        first = f.readline()
        f.seek(0)
        if first.startswith("ImageId,"):  # Kaggle LOC_val_solution.csv
            for i, row in enumerate(csv.DictReader(f), start=2):
                words = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or not words:
                    raise SourceError(f"{path}:{i}: malformed row {row}")
                out[_stem(row["ImageId"])] = words[0]
            return out
        for i, line in enumerate(f, start=1):
            parts = line.replace(",", " ").split()
            if not parts:
                continue
            if len(parts) != 2:
                raise SourceError(f"{path}:{i}: expected '<file> <synset or index>', got {line.strip()!r}")
            out[_stem(parts[0])] = parts[1]
    return out


@SOURCES.register("imagenet")
def build_imagenet_source(cfg: ImageNetConfig, split: str) -> ImageNetSource:
    return ImageNetSource(cfg, split)
