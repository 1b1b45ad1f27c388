"""The built-in synthetic datasets as sources: ``synthetic`` (``uedist.data.synthetic``, faint class textures: the
default for the main job, demos and tests) and ``synthetic_shapes`` (``uedist.data.shapes``, coarse class shapes: the
set on which purifiers can show what they recover). Deterministic by seed; any size, resolution and class count;
need no files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np

from uedist.config import require
from uedist.data.shapes import SHAPES_VERSION, shapes_image
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
    """The texture set. Subclasses draw other pictures (``_draw``) under their own reference tag and version."""

    name = "synthetic"
    default_encoding = "png"
    resize_mode = "none"
    generator = "uedist.data.synthetic"
    tag = ""  # between "synthetic:" and the version in every reference ("shapes-" for the shape set)

    def __init__(self, cfg: SyntheticConfig, split: str) -> None:
        if split not in ("train", "test"):
            raise SourceError(f"{self.name}: unknown split {split!r}; choose train or test")
        self.cfg, self.split = cfg, split
        self.root = Path(".")
        self.image_size = (cfg.size, cfg.size)
        self.classes = [f"class{i:0{len(str(cfg.num_classes - 1))}d}" for i in range(cfg.num_classes)]
        self.count = cfg.num_train if split == "train" else cfg.num_test

    def version(self) -> int:
        return GENERATOR_VERSION  # read at call time (tests stand in an older version)

    def _draw(self, index: int, label: int) -> np.ndarray:
        c = self.cfg
        return synthetic_image(
            index, label=label, num_classes=c.num_classes, size=c.size, seed=c.seed, split=self.split
        )

    def items(self) -> List[Item]:
        labels = synthetic_labels(
            range(self.count), num_classes=self.cfg.num_classes, seed=self.cfg.seed, split=self.split
        )
        # the generator version is part of each reference, hence of the build fingerprint: a set built by an older
        # generator is refused (rebuild with overwrite=true), never mixed with or mistaken for a current one
        ref = f"synthetic:{self.tag}v{self.version()}:{self.split}"
        return [Item(f"{ref}:{i}", int(y)) for i, y in enumerate(labels)]

    def read(self, item: Item) -> np.ndarray:
        return self._draw(int(item.ref.rsplit(":", 1)[1]), item.label)

    def origin(self) -> str:
        c = self.cfg
        return f"synthetic-{self.tag}v{self.version()}(num_classes={c.num_classes}, size={c.size}, seed={c.seed})"

    def describe(self) -> Dict[str, object]:
        return {"generator": self.generator, "version": self.version(), "seed": self.cfg.seed}


class SyntheticShapesSource(SyntheticSource):
    """The shape set: the texture set's labels, sizes and splits; other pictures, its own version and references."""

    name = "synthetic_shapes"
    generator = "uedist.data.shapes"
    tag = "shapes-"

    def version(self) -> int:
        return SHAPES_VERSION

    def _draw(self, index: int, label: int) -> np.ndarray:
        c = self.cfg
        return shapes_image(index, label=label, num_classes=c.num_classes, size=c.size, seed=c.seed, split=self.split)


@SOURCES.register("synthetic")
def build_synthetic_source(cfg: SyntheticConfig, split: str) -> SyntheticSource:
    return SyntheticSource(cfg, split)


@SOURCES.register("synthetic_shapes")
def build_synthetic_shapes_source(cfg: SyntheticConfig, split: str) -> SyntheticShapesSource:
    return SyntheticShapesSource(cfg, split)
