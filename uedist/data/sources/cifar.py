"""CIFAR-10 / CIFAR-100 from the official python batches or from image folders.

Python batches (``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``;
``cifar-100-python/train, test, meta``) are pickles. They are read with a restricted unpickler that only
rebuilds dicts, lists, strings, bytes, numbers and numpy arrays, so a tampered file cannot run code.
Image folders: ``root/{train,test}/<class>/*`` with sorted folder names = the official label order.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Literal, Tuple, Union

import numpy as np

from uedist.data.sources.base import Item, Source, SourceError
from uedist.data.sources.folder import FolderSource
from uedist.io import NUMPY_ARRAY_GLOBALS, restricted_unpickle
from uedist.registry import SOURCES

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

_ALLOWED = NUMPY_ARRAY_GLOBALS | {("_codecs", "encode"), ("builtins", "bytearray")}


def _bytearray_of_data(*args: Any) -> bytearray:
    """``bytearray`` as a pickle may call it: only over data the file holds (bytes, or str + encoding). A size
    argument (``bytearray(10**13)``: a 65-byte file asking for 10 TB) is refused before anything is allocated."""
    if args and not isinstance(args[0], (bytes, bytearray, str)):
        raise pickle.UnpicklingError(f"refusing bytearray({type(args[0]).__name__}) in a CIFAR batch file")
    return bytearray(*args)


def load_cifar_batch(path: Union[str, Path]) -> Dict[str, Any]:
    """One official CIFAR python batch -> dict with str keys. Refuses anything but plain data."""
    try:
        with open(path, "rb") as f:
            d = restricted_unpickle(
                f,
                allowed=_ALLOWED,
                what="a CIFAR batch file",
                encoding="bytes",
                replace={("builtins", "bytearray"): _bytearray_of_data},
            )
    except FileNotFoundError:
        raise SourceError(f"CIFAR batch file not found: {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise SourceError(f"{path}: not a valid CIFAR python batch ({e})") from e
    if not isinstance(d, dict):
        raise SourceError(f"{path}: not a valid CIFAR python batch (top level is {type(d).__name__})")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _batch_images(path: str) -> Tuple[np.ndarray, List[int]]:
    """(images uint8 (N, 32, 32, 3), labels) of a batch file, cached per process while the file is unchanged."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        raise SourceError(f"CIFAR batch file not found: {path}") from None
    return _load_batch(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _load_batch(path: str, mtime_ns: int, size: int) -> Tuple[np.ndarray, List[int]]:
    d = load_cifar_batch(path)
    data = np.asarray(d.get("data"))
    labels = d.get("labels", d.get("fine_labels"))
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise SourceError(f"{path}: expected uint8 data (N, 3072), got {data.dtype} {data.shape}")
    ok = isinstance(labels, (list, tuple, np.ndarray)) and len(labels) == len(data)
    if not ok or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and 0 <= x < 100 for x in labels):
        raise SourceError(
            f"{path}: expected a list of {len(data)} integer labels in [0, 100), got "
            f"{type(labels).__name__}" + (f" of {len(labels)}" if hasattr(labels, "__len__") else "")
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), [int(x) for x in labels]


@dataclass
class CifarConfig:
    root: str = ""  # cifar-10-batches-py / cifar-100-python folder, or a folder of {train,test}/<class>/
    variant: Literal["cifar10", "cifar100"] = "cifar10"
    format: Literal["auto", "python", "folder"] = "auto"


class CifarPythonSource(Source):
    image_size = (32, 32)
    default_encoding = "png"  # the batches are raw pixels: keep them lossless

    def __init__(self, cfg: CifarConfig, split: str) -> None:
        self.root = Path(cfg.root).expanduser()
        self.name, self.split, self.cfg = cfg.variant, split, cfg
        n_classes = 10 if cfg.variant == "cifar10" else 100
        if cfg.variant == "cifar10":
            files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
            meta, key = "batches.meta", "label_names"
        else:
            files = {"train": ["train"], "test": ["test"]}
            meta, key = "meta", "fine_label_names"
        if split not in files:
            raise SourceError(f"{cfg.variant}: unknown split {split!r}; choose train or test")
        self.files = files[split]
        meta_path = self.root / meta
        if meta_path.is_file():
            names = load_cifar_batch(meta_path).get(key, [])
            self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        else:
            self.classes = CIFAR10_CLASSES if cfg.variant == "cifar10" else [str(i) for i in range(100)]
        if len(self.classes) != n_classes:
            raise SourceError(f"{meta_path}: {len(self.classes)} class names, {cfg.variant} has {n_classes}")

    def items(self) -> List[Item]:
        items = []
        for name in self.files:
            _, labels = _batch_images(str(self.root / name))
            bad = [y for y in labels if not 0 <= y < len(self.classes)]
            if bad:
                raise SourceError(f"{self.root / name}: label {bad[0]} outside 0..{len(self.classes) - 1}")
            items += [Item(f"{name}#{i}", y) for i, y in enumerate(labels)]
        return items

    def read(self, item: Item) -> np.ndarray:
        name, row = item.ref.split("#")
        return _batch_images(str(self.root / name))[0][int(row)]


@SOURCES.register("cifar")
def build_cifar_source(cfg: CifarConfig, split: str) -> Source:
    if not cfg.root:
        raise SourceError("cifar: no root folder configured (cifar.root=...)")
    root = Path(cfg.root).expanduser()
    fmt = cfg.format
    if fmt == "auto":
        fmt = (
            "python" if any((root / f).is_file() for f in ("data_batch_1", "test_batch", "train", "meta")) else "folder"
        )
    if fmt == "python":
        return CifarPythonSource(cfg, split)
    n = 10 if cfg.variant == "cifar10" else 100
    src = FolderSource(str(root), split, name=cfg.variant, size=(32, 32), resize_mode="none", num_classes=n)
    if cfg.variant == "cifar10" and src.classes != CIFAR10_CLASSES:
        raise SourceError(
            f"{src.split_dir}: class folders {src.classes} are not the CIFAR-10 classes {CIFAR10_CLASSES}"
        )
    return src
