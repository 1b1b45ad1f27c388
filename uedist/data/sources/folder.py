"""Generic ImageFolder source: ``root/<split>/<class>/*.jpg``; labels = sorted folder names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from uedist.config import require
from uedist.data.images import ResizeMode
from uedist.data.sources.base import Item, Source, SourceError, check_num_classes, class_folders, scan_class_folders
from uedist.registry import SOURCES


@dataclass
class FolderConfig:
    root: str = ""  # holds one folder per split, each with one folder per class
    name: str = "folder"  # dataset name written to the manifest
    size: Tuple[int, int] = (32, 32)  # canonical (height, width)
    resize_mode: ResizeMode = "center_crop"
    num_classes: int = 0  # expected class count; 0 = accept what is found
    allow_empty_classes: bool = False
    encoding: str = "jpg"  # default encoding for this source (photos)
    follow_symlinks: bool = False  # false: a symlink out of root is refused; true: followed, its target recorded

    def validate(self) -> None:
        require(self.size[0] > 0 and self.size[1] > 0, f"size must be positive, got {self.size}")
        require(self.num_classes >= 0, "num_classes must be >= 0")


class FolderSource(Source):
    def __init__(
        self,
        root: str,
        split: str,
        *,
        name: str,
        size: Tuple[int, int],
        resize_mode: ResizeMode = "center_crop",
        num_classes: int = 0,
        allow_empty_classes: bool = False,
        encoding: str = "jpg",
        classes: Optional[List[str]] = None,
        follow_symlinks: bool = False,
    ) -> None:
        if not root:
            raise SourceError(f"{name}: no root folder configured")
        self.root = Path(root).expanduser()
        self.split_dir = self.root / split
        if not self.split_dir.is_dir():
            raise SourceError(f"{name}: split folder not found: {self.split_dir}")
        self.name, self.split, self.image_size, self.resize_mode = name, split, tuple(size), resize_mode
        self.default_encoding = encoding
        self.allow_empty, self.follow_symlinks = allow_empty_classes, follow_symlinks
        found = [p.name for p in class_folders(self.split_dir)]
        check_num_classes(found, num_classes, self.split_dir)
        if classes is not None and found != list(classes):
            raise SourceError(
                f"{self.split_dir}: class folders {found[:10]}… differ from the expected {list(classes)[:10]}…"
            )
        self.classes = found

    def items(self) -> List[Item]:
        labels = {c: i for i, c in enumerate(self.classes)}
        return scan_class_folders(
            self.split_dir, labels, allow_empty=self.allow_empty, rel_to=self.root, follow_symlinks=self.follow_symlinks
        )


@SOURCES.register("folder")
def build_folder_source(cfg: FolderConfig, split: str) -> FolderSource:
    return FolderSource(
        cfg.root,
        split,
        name=cfg.name,
        size=cfg.size,
        resize_mode=cfg.resize_mode,
        num_classes=cfg.num_classes,
        allow_empty_classes=cfg.allow_empty_classes,
        encoding=cfg.encoding,
        follow_symlinks=cfg.follow_symlinks,
    )
