"""Facescrub from identity folders of face crops (``root/<Identity>/*.jpg``), e.g. the output of
``launch/facescrub_download.py`` or the ``images/`` folder of a crops archive.

Protocol (documented in shards/README.md): identities with at least ``min_images`` images are kept; class order =
sorted identity names; each identity's images (sorted by file name) are split by a seeded permutation into the
first ``round(train_fraction * n)`` for train and the rest for test (80/20 by default), so train and test never
share an image and the split does not depend on which other identities exist. Canonical size 112×112.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Tuple

import numpy as np

from uedist.config import require
from uedist.data.images import ResizeMode
from uedist.data.sources.base import Item, Source, SourceError, class_folders, list_images
from uedist.registry import SOURCES


@dataclass
class FacescrubConfig:
    root: str = ""  # one folder per identity
    min_images: int = 10  # identities with fewer images are left out
    train_fraction: float = 0.8
    split_seed: int = 0
    size: Tuple[int, int] = (112, 112)
    resize_mode: ResizeMode = "center_crop"
    num_classes: int = 0  # expected identity count after filtering; 0 = accept what is found

    def validate(self) -> None:
        require(0.0 < self.train_fraction < 1.0, f"train_fraction must be in (0, 1), got {self.train_fraction}")
        require(self.min_images >= 2, f"min_images must be >= 2 (one train and one test image), got {self.min_images}")


def _identity_seed(name: str, seed: int) -> List[int]:
    return [seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")]


class FacescrubSource(Source):
    name = "facescrub"
    default_encoding = "jpg"

    def __init__(self, cfg: FacescrubConfig, split: Literal["train", "test"]) -> None:
        if not cfg.root:
            raise SourceError("facescrub: no root folder configured (facescrub.root=...)")
        if split not in ("train", "test"):
            raise SourceError(f"facescrub: unknown split {split!r}; choose train or test")
        self.root = Path(cfg.root).expanduser()
        self.cfg, self.split = cfg, split
        self.image_size, self.resize_mode = tuple(cfg.size), cfg.resize_mode
        self.files: Dict[str, List[Path]] = {}
        self.dropped: Dict[str, int] = {}
        for folder in class_folders(self.root):
            files = list_images(folder)
            if len(files) >= cfg.min_images:
                self.files[folder.name] = files
            else:
                self.dropped[folder.name] = len(files)
        self.classes = sorted(self.files)
        if not self.classes:
            raise SourceError(f"{self.root}: no identity folder has at least {cfg.min_images} images")
        if cfg.num_classes and len(self.classes) != cfg.num_classes:
            raise SourceError(
                f"{self.root}: {len(self.classes)} identities with >= {cfg.min_images} images, "
                f"the config expects {cfg.num_classes}"
            )

    def items(self) -> List[Item]:
        items: List[Item] = []
        for label, name in enumerate(self.classes):
            files = self.files[name]
            order = np.random.default_rng(_identity_seed(name, self.cfg.split_seed)).permutation(len(files))
            n_train = min(len(files) - 1, max(1, round(self.cfg.train_fraction * len(files))))
            chosen = order[:n_train] if self.split == "train" else order[n_train:]
            items += [Item(os.path.relpath(files[i], self.root), label) for i in sorted(chosen)]
        return items

    def describe(self) -> Dict[str, object]:
        return {
            "protocol": {
                "min_images": self.cfg.min_images,
                "train_fraction": self.cfg.train_fraction,
                "split_seed": self.cfg.split_seed,
                "class_order": "sorted identity names",
            },
            "identities_dropped": self.dropped,
        }


@SOURCES.register("facescrub")
def build_facescrub_source(cfg: FacescrubConfig, split: str) -> FacescrubSource:
    return FacescrubSource(cfg, split)  # type: ignore[arg-type]
