"""Facescrub from identity folders of face crops (``root/<Identity>/*.jpg``), e.g. the output of
``launch/facescrub_download.py`` or the ``images/`` folder of a crops archive.

Protocol (documented in shards/README.md): identities with at least ``min_images`` images are kept; class order =
sorted identity names; each identity's images (sorted by file name) are split by a seeded permutation into the
first ``round(train_fraction * n)`` for train and the rest for test (80/20 by default), so train and test never
share an image and the split does not depend on which other identities exist. Canonical size 112×112.

A paper's subset protocol (the SEM paper's Table 8: "ten classes, each of 120 images, 15 % for testing") is
``identities=10 images_per_identity=120 train_fraction=0.85``: ``images_per_identity`` keeps identities with at
least that many images and takes that many of each (the first of the seeded permutation), ``identities`` then keeps
that many of them, chosen by a permutation seeded with ``split_seed`` alone; both are recorded in the manifest.
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
    identities: int = 0  # keep this many identities, a seeded choice (the SEM paper: 10); 0 = all
    images_per_identity: int = 0  # take this many images of each (the SEM paper: 120); 0 = all

    def validate(self) -> None:
        require(0.0 < self.train_fraction < 1.0, f"train_fraction must be in (0, 1), got {self.train_fraction}")
        require(self.min_images >= 2, f"min_images must be >= 2 (one train and one test image), got {self.min_images}")
        require(self.identities >= 0, f"identities must be >= 0 (0 = all), got {self.identities}")
        require(
            self.images_per_identity == 0 or self.images_per_identity >= 2,
            f"images_per_identity must be 0 (all) or >= 2, got {self.images_per_identity}",
        )


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
        least = max(cfg.min_images, cfg.images_per_identity)
        for folder in class_folders(self.root):
            files = list_images(folder)
            if len(files) >= least:
                self.files[folder.name] = files
            else:
                self.dropped[folder.name] = len(files)
        if not self.files:
            raise SourceError(f"{self.root}: no identity folder has at least {least} images")
        if cfg.identities:
            if len(self.files) < cfg.identities:
                raise SourceError(
                    f"{self.root}: {len(self.files)} identities with >= {least} images, "
                    f"the protocol asks for {cfg.identities}"
                )
            names = sorted(self.files)
            keep = np.random.default_rng([cfg.split_seed, 0x1D]).permutation(len(names))[: cfg.identities]
            self.unchosen = sorted(set(names) - {names[i] for i in keep.tolist()})
            self.files = {names[i]: self.files[names[i]] for i in keep.tolist()}
        else:
            self.unchosen = []
        self.classes = sorted(self.files)
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
            if self.cfg.images_per_identity:
                order = order[: self.cfg.images_per_identity]
            n = len(order)
            n_train = min(n - 1, max(1, round(self.cfg.train_fraction * n)))
            chosen = order[:n_train] if self.split == "train" else order[n_train:]
            items += [Item(os.path.relpath(files[i], self.root), label) for i in sorted(chosen)]
        return items

    def describe(self) -> Dict[str, object]:
        return {
            "protocol": {
                "min_images": self.cfg.min_images,
                "train_fraction": self.cfg.train_fraction,
                "split_seed": self.cfg.split_seed,
                "identities": self.cfg.identities,
                "images_per_identity": self.cfg.images_per_identity,
                "class_order": "sorted identity names",
            },
            "identities_dropped": self.dropped,
            "identities_not_chosen": self.unchosen,
        }


@SOURCES.register("facescrub")
def build_facescrub_source(cfg: FacescrubConfig, split: str) -> FacescrubSource:
    return FacescrubSource(cfg, split)  # type: ignore[arg-type]
