"""SVHN cropped digits (format 2) from the official MATLAB files in ``root``.

Files: ``train_32x32.mat`` (73,257 digits), ``test_32x32.mat`` (26,032) and, as split ``extra``,
``extra_32x32.mat`` (531,131). Each is a MATLAB v5 file with ``X`` uint8 (32, 32, 3, N) — sample ``i`` is
``X[:, :, :, i]``, (H, W, C) — and ``y`` (N, 1) with labels 1..10, where 10 stands for the digit 0. Labels here
are the digit values 0..9 (10 -> 0), classes "0".."9", as in the usual torchvision convention. The pixels are
stored losslessly (PNG).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from uedist.data.sources.base import Item, Source, SourceError
from uedist.registry import SOURCES

SVHN_CLASSES = [str(d) for d in range(10)]
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


def load_svhn_mat(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """One official SVHN file -> (X uint8 (32, 32, 3, N), digit labels int64 (N,) in 0..9). Errors name the file."""
    from scipy.io import loadmat, whosmat  # here, not at the top: importing uedist.data should not load scipy
    from scipy.io.matlab import MatReadError

    try:
        d = loadmat(str(path), variable_names=["X", "y"])
    except FileNotFoundError:
        raise SourceError(f"SVHN file not found: {path}") from None
    except NotImplementedError as e:  # scipy's answer to a MATLAB v7.3 (HDF5) file
        raise SourceError(f"{path}: MATLAB v7.3 files are not supported; the official SVHN files are v5 ({e})") from e
    except (MatReadError, ValueError, TypeError, OSError, EOFError, zlib.error) as e:
        raise SourceError(f"{path}: not a valid MATLAB .mat file ({type(e).__name__}: {e})") from e
    missing = [k for k in ("X", "y") if k not in d]
    if missing:
        found = sorted(name for name, _, _ in whosmat(str(path)))
        raise SourceError(f"{path}: no variable {' or '.join(missing)} (found: {found}); expected the SVHN X and y")
    x, y = np.asarray(d["X"]), np.asarray(d["y"])
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise SourceError(f"{path}: X must be uint8 (32, 32, 3, N), got {x.dtype} {x.shape}")
    n = x.shape[3]
    if y.shape != (n, 1):
        raise SourceError(f"{path}: y must be ({n}, 1) to match X's {n} samples, got {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
        raise SourceError(f"{path}: y must hold whole numbers, got {y.dtype}")
    y = y.reshape(-1).astype(np.int64)
    bad = np.flatnonzero((y < 1) | (y > 10))
    if bad.size:
        i = int(bad[0])
        raise SourceError(
            f"{path}: label {y[i]} at sample {i} outside 1..10 ({bad.size} such; SVHN stores the digit 0 as 10)"
        )
    return x, np.where(y == 10, 0, y)


def _split_arrays(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """``load_svhn_mat``, cached per process while the file is unchanged (each worker loads a split once)."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        raise SourceError(f"SVHN file not found: {path}") from None
    return _load_split(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=2)  # a split is one file; extra alone is 1.6 GB of pixels
def _load_split(path: str, mtime_ns: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
    return load_svhn_mat(Path(path))


@dataclass
class SvhnConfig:
    root: str = ""  # folder holding train_32x32.mat, test_32x32.mat (and extra_32x32.mat for split extra)


class SvhnSource(Source):
    name = "svhn"
    image_size = (32, 32)
    resize_mode = "none"  # every digit is 32x32 already
    default_encoding = "png"  # raw pixels: keep them lossless

    def __init__(self, cfg: SvhnConfig, split: str) -> None:
        if not cfg.root:
            raise SourceError("svhn: no root folder configured (svhn.root=...)")
        if split not in SVHN_FILES:
            raise SourceError(f"svhn: unknown split {split!r}; choose {', '.join(SVHN_FILES)}")
        self.root = Path(cfg.root).expanduser()
        self.cfg, self.split, self.file = cfg, split, SVHN_FILES[split]
        self.classes = list(SVHN_CLASSES)
        if not (self.root / self.file).is_file():
            raise SourceError(f"svhn: {self.file} not found in {self.root} (split {split})")

    def items(self) -> List[Item]:
        _, labels = _split_arrays(str(self.root / self.file))
        return [Item(f"{self.file}#{i}", int(y)) for i, y in enumerate(labels)]

    def read(self, item: Item) -> np.ndarray:
        name, row = item.ref.split("#")
        x, _ = _split_arrays(str(self.root / name))
        return np.ascontiguousarray(x[:, :, :, int(row)])  # (32, 32, 3)

    def describe(self) -> Dict[str, object]:
        return {"file": self.file, "label_map": "digit value 0..9 (the files' label 10 is the digit 0)"}


@SOURCES.register("svhn")
def build_svhn_source(cfg: SvhnConfig, split: str) -> SvhnSource:
    return SvhnSource(cfg, split)
