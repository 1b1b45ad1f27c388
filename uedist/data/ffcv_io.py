"""FFCV ``.beton`` copies of shard sets, and a loader over them with the same batch form as ``loaders.py``.

    beton = convert_to_beton("shards/cifar10/train")          # -> shards/cifar10/train/data.beton
    for batch in make_ffcv_loader(beton, batch_size=256):     # {"image": uint8 (B, 3, H, W), "label", "key"}
        ...

A beton holds, per sample in manifest order (shard, then key order): the pixels exactly as our reader decodes
them (``RGBImageField(write_mode="raw")``: uint8 (H, W, 3), no second lossy encoding), the label, and the key as
an integer (keys are zero-padded global indices, ``format_key``). Conversion reads the shards with our verified
reader (sha256 checked, nothing unpickled), writes to a temporary name beside the target and renames it; a
sidecar ``<beton>.json`` records the shards' sha256s so an up-to-date beton is not rebuilt.

ffcv is optional (``pip install -e .[ffcv]``); it is imported only inside the functions that need it.
"""

from __future__ import annotations

import bisect
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple, Union

import numpy as np

from uedist.data.images import decode_image
from uedist.data.manifest import Manifest, load_manifest
from uedist.data.shards import Sample, format_key, read_shard
from uedist.io import atomic_write_json

PathLike = Union[str, os.PathLike]
BETON = "data.beton"
SIDECAR_FORMAT = "uedist-beton"
SIDECAR_VERSION = 1
_MIN_PAGE = 1 << 23  # ffcv's default page (8 MiB); a raw image must fit in one page


def _import_ffcv() -> Any:
    try:
        import ffcv  # noqa: F401
        import ffcv.fields  # noqa: F401
        import ffcv.loader  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"FFCV support needs the optional ffcv package ({e}); install it with: pip install -e .[ffcv] "
            "(it builds from source: apt-get install pkg-config libturbojpeg0-dev libopencv-dev first)"
        ) from e
    return ffcv


def sidecar_path(beton_path: PathLike) -> Path:
    """``<beton>.json``: what the beton was built from (shard sha256s), for the up-to-date check."""
    p = Path(beton_path)
    return p.with_name(p.name + ".json")


def _expected_sidecar(folder: Path, m: Manifest) -> Dict[str, Any]:
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "source": str(folder.resolve()),
        "num_samples": m.num_samples,
        "image_size": list(m.image_size),
        "fields": {"image": "RGBImageField(raw) uint8 (H, W, 3)", "label": "IntField", "key": "IntField"},
        "shards": [[s.name, s.sha256] for s in m.shards],
    }


def beton_up_to_date(folder: PathLike, beton_path: Optional[PathLike] = None) -> bool:
    """True when ``beton_path`` exists and its sidecar says it was built from exactly this shard set's shards."""
    folder = Path(folder)
    beton = Path(beton_path) if beton_path is not None else folder / BETON
    side = sidecar_path(beton)
    if not (beton.is_file() and side.is_file()):
        return False
    try:
        rec = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    want = _expected_sidecar(folder, load_manifest(folder))
    same = all(rec.get(k) == v for k, v in want.items() if k != "source")
    return same and rec.get("beton_bytes") == beton.stat().st_size


class _ShardSetView:
    """Random access to the decoded samples of a shard set, for ffcv's writer processes.

    ``view[i]`` -> (image uint8 (H, W, 3), label, key as int). Sample i is the i-th in manifest order; the shard
    holding it is read (verified) and kept until a sample from another shard is asked for, so a writer worker
    that walks a chunk of consecutive indices reads each shard once.
    """

    def __init__(self, folder: Path, m: Manifest) -> None:
        self.folder, self.m = folder, m
        self.starts = np.cumsum([0] + [s.count for s in m.shards]).tolist()
        self._shard: int = -1
        self._samples: List[Sample] = []

    def __len__(self) -> int:
        return self.m.num_samples

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int, int]:
        i = int(i)
        shard = bisect.bisect_right(self.starts, i) - 1
        if shard != self._shard:
            self._samples = list(
                read_shard(self.folder, self.m.shards[shard], verify=True, num_classes=self.m.num_classes)
            )
            self._shard = shard
        s = self._samples[i - self.starts[shard]]
        where = f"{self.folder / self.m.shards[shard].name}:{s.key}"
        if not s.key.isdigit() or format_key(int(s.key)) != s.key:
            raise ValueError(
                f"{where}: key {s.key!r} is not a zero-padded index like {format_key(12)!r}; "
                "the beton stores keys as integers"
            )
        return decode_image(s.data, s.ext, self.m.image_size, name=where), int(s.label), int(s.key)


def convert_to_beton(folder: PathLike, out_path: Optional[PathLike] = None, *, num_workers: int = 2) -> Path:
    """Write the shard set in ``folder`` as an FFCV beton (default ``<folder>/data.beton``); returns its path.

    Pixels are stored raw (uint8 (H, W, 3), exactly what ``decode_image`` gives), plus ``label`` and ``key``
    (int). Written to a temporary file beside the target, then renamed; skipped when the sidecar
    ``<beton>.json`` shows the same shards (sha256) and the beton's size matches.
    """
    _import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    folder = Path(folder)
    m = load_manifest(folder)
    beton = Path(out_path) if out_path is not None else folder / BETON
    if beton_up_to_date(folder, beton):
        return beton
    if m.num_samples == 0:
        raise ValueError(f"{folder}: shard set is empty, nothing to convert")
    h, w = m.image_size
    page = max(_MIN_PAGE, 1 << int(np.ceil(np.log2(h * w * 3 + 4096))))
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "key": IntField()}
    beton.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{beton.name}.", suffix=".tmp", dir=beton.parent)
    os.close(fd)
    try:
        writer = DatasetWriter(tmp, fields, page_size=page, num_workers=max(1, num_workers))
        # Chunks of one shard's length: each writer process reads each shard once (shards are equal but the last).
        writer.from_indexed_dataset(_ShardSetView(folder, m), chunksize=max(1, m.shards[0].count))
        sidecar_path(beton).unlink(missing_ok=True)  # a crash after the rename must not leave an old "up to date"
        os.replace(tmp, beton)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(sidecar_path(beton), {**_expected_sidecar(folder, m), "beton_bytes": beton.stat().st_size})
    return beton


class FfcvLoader:
    """Iterable over an ffcv ``Loader``, yielding our batch dicts (see ``make_ffcv_loader``). Each ``iter`` is
    one epoch; random order draws a new permutation per epoch (ffcv: seed + epoch)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        it = iter(self.loader)
        try:
            for image, label, key in it:
                # ffcv reuses its output buffers (batches_ahead + 2 slots): copy before handing the batch out.
                yield {
                    "image": image.contiguous(),  # (B, 3, H, W) uint8; ffcv gives a channels_last view -> copy
                    "label": label.reshape(-1).clone(),  # (B,) int64
                    "key": [format_key(int(k)) for k in key.reshape(-1).tolist()],
                }
        finally:
            it.close()  # stop ffcv's producer thread when an epoch is abandoned


def make_ffcv_loader(
    beton_path: PathLike,
    *,
    batch_size: int,
    num_workers: int = 2,
    order: Literal["random", "sequential"] = "random",
    seed: int = 0,
    drop_last: bool = False,
    distributed: bool = False,
) -> FfcvLoader:
    """Batches ``{"image": uint8 (B, 3, H, W) in [0, 255], "label": int64 (B,), "key": list of B str}`` from a
    beton written by ``convert_to_beton`` — the same form as ``make_train_loader`` / ``make_map_loader``.

    ``num_workers`` is ffcv's thread count (numba threads in this process, not worker processes).
    ``order="random"`` is ffcv's RANDOM (a full permutation per epoch; QUASI_RANDOM is not implemented with
    ``distributed=True``, so it is not offered); ``distributed`` splits samples across the ranks of the
    initialized ``torch.distributed`` group like ``DistributedSampler`` (padding to equal length). The first
    epoch of a new loader compiles its pipeline with numba (seconds).
    """
    _import_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor, ToTorchImage

    orders = {"random": OrderOption.RANDOM, "sequential": OrderOption.SEQUENTIAL}
    if order not in orders:
        raise ValueError(f"order must be one of {sorted(orders)}, got {order!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    beton = Path(beton_path)
    if not beton.is_file():
        raise FileNotFoundError(f"{beton}: no such beton (make one with convert_to_beton)")
    pipelines = {
        "image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage(channels_last=True)],
        "label": [IntDecoder(), ToTensor()],
        "key": [IntDecoder(), ToTensor()],
    }
    loader = Loader(
        str(beton),
        batch_size=batch_size,
        num_workers=max(1, num_workers),
        order=orders[order],
        seed=seed,
        drop_last=drop_last,
        distributed=distributed,
        pipelines=pipelines,
        os_cache=True,
    )
    return FfcvLoader(loader)


__all__ = ["convert_to_beton", "make_ffcv_loader", "beton_up_to_date", "sidecar_path", "FfcvLoader", "BETON"]
