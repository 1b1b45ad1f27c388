"""The built-in synthetic dataset (``uedist.data.synthetic``) as a source: the default for the main job,
demos and tests. Deterministic by seed; any size, resolution and class count; needs no files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np

from uedist.config import require
from uedist.data.sources.base import Item, Source, SourceError
from uedist.data.synthetic import GENERATOR_VERSION, synthetic_image, synthetic_labels
from uedist.registry import SOURCES


@dataclass
class SyntheticConfig:
    num_classes: int = 10
    size: int = 32  # square images, any resolution
    num_train: int = 5000
    num_test: int = 1000
    seed: int = 0

    def validate(self) -> None:
        require(self.num_classes >= 2, f"num_classes must be >= 2, got {self.num_classes}")
        require(self.size >= 8, f"size must be >= 8, got {self.size}")
        require(self.num_train >= 1 and self.num_test >= 1, "num_train and num_test must be >= 1")


class SyntheticSource(Source):
    name = "synthetic"
    default_encoding = "png"
    resize_mode = "none"

    def __init__(self, cfg: SyntheticConfig, split: str) -> None:
        if split not in ("train", "test"):
            raise SourceError(f"synthetic: unknown split {split!r}; choose train or test")
        self.cfg, self.split = cfg, split
        self.root = Path(".")
        self.image_size = (cfg.size, cfg.size)
        self.classes = [f"class{i:0{len(str(cfg.num_classes - 1))}d}" for i in range(cfg.num_classes)]
        self.count = cfg.num_train if split == "train" else cfg.num_test

    def items(self) -> List[Item]:
        labels = synthetic_labels(range(self.count), num_classes=self.cfg.num_classes, seed=self.cfg.seed, split=self.split)
        # the generator version is part of each reference, hence of the build fingerprint: a set built by an older
        # generator is refused (rebuild with overwrite=true), never mixed with or mistaken for a current one
        return [Item(f"synthetic:v{GENERATOR_VERSION}:{self.split}:{i}", int(y)) for i, y in enumerate(labels)]

    def read(self, item: Item) -> np.ndarray:
        index = int(item.ref.rsplit(":", 1)[1])
        c = self.cfg
        return synthetic_image(index, label=item.label, num_classes=c.num_classes, size=c.size, seed=c.seed, split=self.split)

    def origin(self) -> str:
        c = self.cfg
        return f"synthetic-v{GENERATOR_VERSION}(num_classes={c.num_classes}, size={c.size}, seed={c.seed})"

    def describe(self) -> Dict[str, object]:
        return {"generator": "uedist.data.synthetic", "version": GENERATOR_VERSION, "seed": self.cfg.seed}


@SOURCES.register("synthetic")
def build_synthetic_source(cfg: SyntheticConfig, split: str) -> SyntheticSource:
    return SyntheticSource(cfg, split)
