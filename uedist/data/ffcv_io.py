"""FFCV ``.beton`` copies of shard sets, a loader over them with the same batch form as ``loaders.py``, and the
FFCV training feed of the victim and the SEM / REM surrogate (``data.format: ffcv``).

    beton = convert_to_beton("shards/cifar10/train")          # -> shards/cifar10/train/data.beton (+ .json)
    for batch in make_ffcv_loader(beton, batch_size=256):     # {"image": uint8 (B, 3, H, W), "label", "key"}
        ...

A beton holds, per sample in manifest order (shard, then key order): the pixels exactly as our reader decodes
them (``RGBImageField(write_mode="raw")``: uint8 (H, W, 3), no second lossy encoding), the label, and the key as
an integer (keys are zero-padded global indices, ``format_key``). Conversion reads the shards with our verified
reader (sha256 checked, nothing unpickled), writes to a temporary name beside the target and renames it; a
provenance sidecar ``<beton>.json`` records what it was written from (the sha256 of the set's manifest.json, its
shards' sha256s, sample count, classes, image size, encoding), so an up-to-date beton is not rebuilt and a
training job refuses a beton of another set (:func:`check_beton`).

**Training feed** (:class:`TrainFeed`, :func:`make_ffcv_train_loader`): epochs of FFCV's RANDOM order (a new
permutation per epoch from ``seed + epoch``; with several ranks FFCV's ``DistributedSampler`` split, padded to
equal length), ``drop_last``, so every rank takes the same number of steps. The training recipe is the job's own:
batches come out as uint8 and the job's on-device augmentation runs on them, as with the shard stream; only the
sample order differs. What FFCV cannot give, and what the feed does instead:

- *exact resume at any step*: an FFCV epoch cannot be entered in the middle without reading (decoding) its first
  part, so a run with ``data.format: ffcv`` checkpoints at epoch ends only (``ckpt_every`` rounded up to whole
  epochs) and resumes exactly there (same order, same augmentation draws); a mid-epoch checkpoint (another world
  size or batch) is refused, as is a checkpoint written under the other format;
- *order independent of the world size*: the split across ranks is FFCV's (the shard stream's too depends on it);
- *per-sample seeded passes*: none are offered (EM, whose rounds train on sets written during the job, refuses
  ``data.format: ffcv``).

ffcv is optional (``pip install -e .[ffcv]``); it is imported only inside the functions that need it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Tuple, Union

import numpy as np

from uedist.config import ConfigError, runtime
from uedist.data.images import decode_image
from uedist.data.manifest import MANIFEST, Manifest, load_manifest
from uedist.data.shards import Sample, format_key, read_shard
from uedist.dist import get_logger
from uedist.io import atomic_write_json

PathLike = Union[str, os.PathLike]
BETON = "data.beton"
SIDECAR_FORMAT = "uedist-beton"
SIDECAR_VERSION = 2  # 2: + the manifest sha256, dataset, classes, encoding
_MIN_PAGE = 1 << 23  # ffcv's default page (8 MiB); a raw image must fit in one page
FORMATS = ("shards", "ffcv")  # data.format
log = get_logger(__name__)


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
    """The provenance of a beton written from the shard set in ``folder`` (manifest ``m``), as it is now."""
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "source": str(folder.resolve()),
        "manifest_sha256": hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest(),
        "dataset": m.dataset,
        "num_samples": m.num_samples,
        "classes": list(m.classes),
        "image_size": list(m.image_size),
        "encoding": m.encoding,
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
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared beton from colleagues (as uedist.io's files)
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


@dataclass
class DataFormat:
    """The ``data`` keys that pick what feeds a training job's steps (victim; SEM / REM surrogate). Both are runtime
    fields, left out of the config identity (so the shipped configs keep theirs); a run's checkpoints written under
    one format are refused under the other (:meth:`TrainFeed.batches`)."""

    # shards: the shard stream (exact resume at any step); ffcv: the .beton of data.train written by `uedist shards
    # to-ffcv` (checkpoints and resume at epoch ends; docs/victims.md)
    format: Literal["shards", "ffcv"] = runtime("shards")
    beton: str = runtime("")  # data.format=ffcv: the .beton of data.train; "" = <data.train>/data.beton


class BetonError(ConfigError):
    """``data.format: ffcv`` cannot run as asked: no beton, a beton of another set, ffcv not installed, or a resume
    FFCV's loader cannot make exact (exit code 2)."""


def check_beton(folder: PathLike, beton_path: Optional[PathLike] = None) -> Path:
    """The beton of the shard set ``folder`` (default ``<folder>/data.beton``), checked against the set's manifest
    through its provenance sidecar; :class:`BetonError` naming the fix when it is missing or was written from
    anything else (another set, or this set before a rebuild)."""
    folder = Path(folder)
    beton = Path(beton_path) if beton_path else folder / BETON
    fix = f"write it with: uedist shards to-ffcv {folder}" + (f" --out {beton}" if beton_path else "")
    try:
        _import_ffcv()
    except ImportError as e:
        raise BetonError(f"data.format=ffcv: {e}") from None
    if not beton.is_file():
        raise BetonError(f"data.format=ffcv: no .beton at {beton}; {fix}")
    side = sidecar_path(beton)
    try:
        rec = json.loads(side.read_text())
    except (OSError, ValueError):
        raise BetonError(
            f"{beton}: its provenance {side.name} is missing or unreadable, so it cannot be matched to {folder}; {fix}"
        ) from None
    want = {k: v for k, v in _expected_sidecar(folder, load_manifest(folder)).items() if k != "source"}
    diff = [k for k, v in want.items() if not isinstance(rec, dict) or rec.get(k) != v]
    if not diff and rec.get("beton_bytes") != beton.stat().st_size:
        diff = ["beton_bytes"]
    if diff:
        raise BetonError(
            f"{beton} was not written from the shard set {folder} as it is now ({', '.join(diff[:4])} differ); {fix}"
        )
    return beton


def ffcv_epoch_steps(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Steps of one FFCV epoch per rank: each rank's share (``DistributedSampler``: ceil(N / world), padded) in
    whole batches of ``batch_size`` (per rank; ``drop_last``)."""
    return math.ceil(num_samples / world_size) // batch_size


class FfcvTrainStream:
    """This rank's batches for steps ``start_step + 1 .. num_steps`` from a beton, epoch after epoch (see the module
    docstring); ``start_step`` must be an epoch end. Use :func:`make_ffcv_train_loader`."""

    def __init__(self, loader: FfcvLoader, *, num_steps: int, start_step: int) -> None:
        self.loader, self.num_steps, self.start_step = loader, num_steps, start_step
        self.epoch_steps = len(loader)
        if self.epoch_steps < 1:
            raise BetonError(
                f"data.format=ffcv: the per-rank batch {loader.loader.batch_size} is larger than a "
                f"rank's share of the {loader.loader.reader.num_samples} samples (drop_last)"
            )
        if start_step % self.epoch_steps:
            raise BetonError(
                f"data.format=ffcv: step {start_step} is not an epoch end (an epoch is "
                f"{self.epoch_steps} steps); FFCV's loader starts only at epoch boundaries"
            )

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start_step)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        step, epoch = self.start_step, self.start_step // self.epoch_steps
        while step < self.num_steps:
            self.loader.loader.next_epoch = epoch  # FFCV's order of epoch e: a permutation seeded by seed + e
            it = iter(self.loader)
            try:
                for batch in it:
                    yield batch
                    step += 1
                    if step >= self.num_steps:
                        return
            finally:
                it.close()  # stops FFCV's reader thread when the run ends mid-epoch
            epoch += 1


def make_ffcv_train_loader(
    beton_path: PathLike,
    *,
    batch_size: int,
    num_steps: int,
    seed: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    start_step: int = 0,
) -> FfcvTrainStream:
    """``num_steps - start_step`` training batches of ``batch_size`` (per rank) from a beton: FFCV RANDOM order,
    ``drop_last``, the ranks of the initialized ``torch.distributed`` group splitting each epoch when
    ``world_size > 1``. Batches as :func:`make_ffcv_loader`'s: uint8 (B, 3, H, W) in [0, 255], labels, keys."""
    loader = make_ffcv_loader(
        beton_path,
        batch_size=batch_size,
        num_workers=num_workers,
        order="random",
        seed=seed,
        drop_last=True,
        distributed=world_size > 1,
    )
    return FfcvTrainStream(loader, num_steps=num_steps, start_step=start_step)


class TrainFeed:
    """What feeds a training job's steps, from its ``data`` section (``train``, ``batch_size`` global, ``workers``,
    ``format``, ``beton``): made at job start, where ``data.format: ffcv`` checks the beton (exit code 2 when it is
    missing or of another set). :meth:`ckpt_every` rounds the checkpoint cadence to epoch ends with FFCV;
    :meth:`batches` is the loop's batch source, either format, refusing a resume it cannot make exact."""

    def __init__(self, data: Any, *, num_samples: int, seed: int, accelerator: Any) -> None:
        fmt = getattr(data, "format", "shards")
        if fmt not in FORMATS:
            raise ConfigError(f"data.format must be one of {list(FORMATS)}, got {fmt!r}")
        self.data, self.format, self.seed, self.accelerator = data, fmt, seed, accelerator
        world = accelerator.num_processes
        self.beton: Optional[Path] = None
        self.epoch_steps = 0
        if fmt == "ffcv":
            if data.batch_size % world:
                raise ConfigError(f"data.batch_size {data.batch_size} is not divisible by {world} processes")
            self.beton = check_beton(data.train, getattr(data, "beton", ""))
            self.epoch_steps = ffcv_epoch_steps(num_samples, data.batch_size // world, world)
            if self.epoch_steps < 1:
                raise BetonError(
                    f"data.format=ffcv: data.batch_size {data.batch_size} is more than the {num_samples} samples of "
                    f"{data.train} give each of {world} process(es) (FFCV drops the last partial batch)"
                )

    def ckpt_every(self, every: int) -> int:
        """The checkpoint cadence in steps: ``every``, or with FFCV ``every`` rounded up to whole epochs."""
        if self.format != "ffcv" or every <= 0 or self.epoch_steps <= 0 or every % self.epoch_steps == 0:
            return every
        rounded = math.ceil(every / self.epoch_steps) * self.epoch_steps
        log.info(
            "data.format=ffcv: checkpoints at epoch ends, every %d steps (ckpt_every %d rounded up to whole "
            "epochs of %d steps)",
            rounded,
            every,
            self.epoch_steps,
        )
        return rounded

    def batches(self, p: Any, total: int, *, shards: Callable[..., Any]) -> Callable[[], Any]:
        """The zero-argument batch source of ``run_steps`` for the prepared run ``p`` (steps ``p.start + 1 ..
        total``): FFCV's stream, or ``shards(data, p, total=, seed=, accelerator=)`` (the shard stream,
        ``uedist.engine.train.loop.train_batches``). Called, it first refuses (:class:`BetonError`) continuing a
        checkpoint written under the other format, or one that is not at an FFCV epoch end."""

        def make() -> Any:
            saved = ((p.resumed.get("config") or {}).get("data") or {}).get("format", "shards") if p.resumed else None
            if saved is not None and saved != self.format:
                raise BetonError(
                    f"{p.ckpt.dir}: this run was checkpointed with data.format={saved}, and the sample order of "
                    f"data.format={self.format} differs; continue it with data.format={saved}, or use a new run name"
                )
            if self.format == "shards":
                return shards(self.data, p, total=total, seed=self.seed, accelerator=self.accelerator)
            world = self.accelerator.num_processes
            if p.start % self.epoch_steps:
                raise BetonError(
                    f"{p.ckpt.dir}: step {p.start} is mid-epoch for data.format=ffcv at {world} process(es) (an "
                    f"epoch is {self.epoch_steps} steps); FFCV resumes at epoch ends only: resume with the world "
                    "size the run was started with, or data.format=shards"
                )
            return make_ffcv_train_loader(
                self.beton,  # type: ignore[arg-type]
                batch_size=self.data.batch_size // world,
                num_steps=total,
                seed=self.seed,
                world_size=world,
                num_workers=self.data.workers,
                start_step=p.start,
            )

        return make


__all__ = [
    "BETON",
    "BetonError",
    "DataFormat",
    "FfcvLoader",
    "FfcvTrainStream",
    "TrainFeed",
    "beton_up_to_date",
    "check_beton",
    "convert_to_beton",
    "ffcv_epoch_steps",
    "make_ffcv_loader",
    "make_ffcv_train_loader",
    "sidecar_path",
]
