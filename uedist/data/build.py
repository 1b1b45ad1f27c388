"""Ingest: a registered source -> a shard set (WebDataset tars + manifest.json), in parallel, resumably.

    uedist shards build --config configs/shards/cifar10.yaml cifar.root=/data/cifar-10-batches-py

Same inputs and settings give byte-identical shards: items are listed in a fixed order, shuffled once with
``seed`` (so every shard mixes classes — WebDataset streams read shards sequentially), and sample ``i`` of the
shuffled order gets key ``%08d % i`` for life. Each shard is written under a temporary name and renamed, then
recorded; the manifest comes last; a rerun of the same command skips the recorded shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Literal, Sequence, Tuple

import numpy as np

from uedist.config import config_to_dict, positive, require
from uedist.data.images import CorruptImageError, prepare_sample
from uedist.data.manifest import FORMAT_VERSION, Manifest, load_manifest, provenance
from uedist.data.shards import Sample, ShardSetWriter, format_key, shard_info_from_record
from uedist.data.sources import Item, Source, SourceError
from uedist.data.sources.cifar import CifarConfig
from uedist.data.sources.facescrub import FacescrubConfig
from uedist.data.sources.folder import FolderConfig
from uedist.data.sources.imagenet import ImageNetConfig
from uedist.data.sources.pets import PetsConfig
from uedist.data.sources.svhn import SvhnConfig
from uedist.data.sources.synthetic import SyntheticConfig
from uedist.io import hold_lock
from uedist.registry import SOURCES

log = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    """``uedist shards build``: which source, which splits, where, and how samples are stored."""

    # a registered source: imagenet | facescrub | cifar | svhn | pets | folder | synthetic | synthetic_shapes
    source: str = "synthetic"
    splits: List[str] = field(default_factory=lambda: ["train", "test"])
    out: str = ""  # parent folder; each split goes to <out>/<split>. Default: shards/<dataset>
    shard_size: int = positive(1000)  # samples per shard (make shards >= ranks x workers for training streams)
    encoding: Literal["auto", "jpg", "png", "npy"] = "auto"  # auto: the source's default (png for pixel data)
    jpeg_quality: int = 95
    keep_source_bytes: bool = True  # store a source JPEG unchanged when it already is RGB at the canonical size
    shuffle: bool = True
    seed: int = 0
    workers: int = 2  # processes; 0 = in this process
    skip_corrupt: bool = False  # false: a corrupt image stops the build naming it; true: skip and record it
    overwrite: bool = False
    imagenet: ImageNetConfig = field(default_factory=ImageNetConfig)
    facescrub: FacescrubConfig = field(default_factory=FacescrubConfig)
    cifar: CifarConfig = field(default_factory=CifarConfig)
    svhn: SvhnConfig = field(default_factory=SvhnConfig)
    pets: PetsConfig = field(default_factory=PetsConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    synthetic_shapes: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> None:
        require(self.source in SOURCES, f"source: unknown source {self.source!r}; known: {', '.join(SOURCES.names())}")
        require(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")
        require(1 <= self.jpeg_quality <= 100, f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        require(self.workers >= 0, "workers must be >= 0")
        require(
            len(self.splits) >= 1 and len(set(self.splits)) == len(self.splits),
            f"splits must be distinct, got {self.splits}",
        )

    def source_section(self) -> Any:
        return getattr(self, self.source)


def make_source(cfg: BuildConfig, split: str) -> Source:
    return SOURCES.build(cfg.source, cfg.source_section(), split)


def _fingerprint(cfg: BuildConfig, split: str, items: Sequence[Item]) -> str:
    h = hashlib.sha256()
    settings = {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "split": split,
        "section": config_to_dict(cfg.source_section()),
        "shard_size": cfg.shard_size,
        "encoding": cfg.encoding,
        "jpeg_quality": cfg.jpeg_quality,
        "keep_source_bytes": cfg.keep_source_bytes,
        "shuffle": cfg.shuffle,
        "seed": cfg.seed,
        "skip_corrupt": cfg.skip_corrupt,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for it in items:
        h.update(f"{it.ref}\0{it.label}\n".encode())
    return h.hexdigest()


def _write_one(
    source: Source,
    folder: str,
    fingerprint: str,
    *,
    index: int,
    items: List[Tuple[int, Item]],
    encoding: str,
    jpeg_quality: int,
    keep_source_bytes: bool,
    skip_corrupt: bool,
) -> Dict[str, Any]:
    """Build shard ``index`` from (global index, item) pairs. Runs in a worker process."""
    skipped: List[Dict[str, Any]] = []
    counts = [0] * len(source.classes)

    def samples():
        for gi, item in items:
            name = str(source.root / item.ref) if not item.ref.startswith("synthetic:") else item.ref
            try:
                raw = source.read(item)
                p = prepare_sample(
                    raw,
                    label=item.label,
                    name=name,
                    size=source.image_size,
                    encoding=encoding,
                    resize_mode=source.resize_mode,
                    jpeg_quality=jpeg_quality,
                    keep_source_bytes=keep_source_bytes,
                )
            except (CorruptImageError, OSError) as e:
                if not skip_corrupt:
                    raise CorruptImageError(f"{e} (set skip_corrupt=true to skip and record such files)") from e
                skipped.append({"key": format_key(gi), "ref": item.ref, "label": item.label, "error": str(e)})
                continue
            counts[item.label] += 1
            yield Sample(format_key(gi), item.label, p.ext, p.data, {"src": item.ref.encode()})

    writer = ShardSetWriter.attach(folder, fingerprint)
    return writer.write_shard(index, samples(), class_counts=counts, skipped=skipped)


def _write_shards(
    cfg: BuildConfig,
    source: Any,
    out_dir: Path,
    fingerprint: str,
    *,
    chunks: List[Any],
    records: Dict[int, Dict[str, Any]],
    todo: List[int],
    encoding: str,
    desc: str,
    progress: bool,
) -> None:
    """Write the shards ``todo`` (each a chunk of items) in ``cfg.workers`` spawned processes, or here with one;
    fills ``records`` with each written shard's record."""
    args = dict(
        encoding=encoding,
        jpeg_quality=cfg.jpeg_quality,
        keep_source_bytes=cfg.keep_source_bytes,
        skip_corrupt=cfg.skip_corrupt,
    )
    bar = _progress_bar(len(chunks), len(records), desc, enabled=progress)
    try:
        if cfg.workers <= 1 or len(todo) <= 1:
            for i in todo:
                records[i] = _write_one(source, str(out_dir), fingerprint, index=i, items=chunks[i], **args)
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=min(cfg.workers, len(todo)), mp_context=get_context("spawn")) as ex:
                futs = {
                    ex.submit(_write_one, source, str(out_dir), fingerprint, index=i, items=chunks[i], **args): i
                    for i in todo
                }
                for fut in as_completed(futs):
                    records[futs[fut]] = fut.result()
                    bar.update(1)
    finally:
        bar.close()


def build_split(cfg: BuildConfig, split: str, out_dir: Path, *, progress: bool = True) -> Manifest:
    """Build one split's shard set into ``out_dir`` (resuming a killed build); returns its manifest."""
    source = make_source(cfg, split)
    encoding = source.default_encoding if cfg.encoding == "auto" else cfg.encoding
    items = source.items()
    if not items:
        raise SourceError(f"{cfg.source}/{split}: no images found")
    order = np.random.default_rng(cfg.seed).permutation(len(items)) if cfg.shuffle else np.arange(len(items))
    indexed = [(gi, items[j]) for gi, j in enumerate(order.tolist())]
    chunks = [indexed[i : i + cfg.shard_size] for i in range(0, len(indexed), cfg.shard_size)]
    fingerprint = _fingerprint(cfg, split, items)
    hold_lock(out_dir.parent, what=f"shard build of {out_dir.name} into")  # two builds into one folder: refused
    if (out_dir / "manifest.json").exists() and not cfg.overwrite:
        m = load_manifest(out_dir)
        if m.provenance.get("fingerprint") == fingerprint:
            log.info("%s: already built (%d samples), nothing to do", out_dir, m.num_samples)
            return m
    writer = ShardSetWriter(out_dir, fingerprint, overwrite=cfg.overwrite)
    records: Dict[int, Dict[str, Any]] = {}
    todo = []
    for i in range(len(chunks)):
        rec = writer.done(i)
        if rec is not None:
            records[i] = rec
        else:
            todo.append(i)
    if records:
        log.info("%s: resuming, %d of %d shards already complete", out_dir, len(records), len(chunks))
    t0 = time.time()
    _write_shards(
        cfg,
        source,
        out_dir,
        fingerprint,
        chunks=chunks,
        records=records,
        todo=todo,
        encoding=encoding,
        desc=f"{source.name}/{split}",
        progress=progress,
    )
    shards = [shard_info_from_record(records[i]) for i in range(len(chunks))]
    counts = np.sum([records[i]["class_counts"] for i in range(len(chunks))], axis=0).astype(int).tolist()
    skipped = [s for i in range(len(chunks)) for s in records[i]["skipped"]]
    manifest = Manifest(
        dataset=source.name,
        split=split,
        classes=list(source.classes),
        image_size=tuple(source.image_size),
        encoding=encoding,
        shards=shards,
        num_samples=sum(s.count for s in shards),
        class_counts=counts,
        skipped=skipped,
        provenance={**provenance("ingest", config_to_dict(cfg), [source.origin()]), "fingerprint": fingerprint},
        extra=source.describe(),
    )
    writer.finalize(manifest)
    dt = time.time() - t0
    log.info(
        "%s: wrote %d samples in %d shards (%s, %d classes, %dx%d) in %.1fs%s",
        out_dir,
        manifest.num_samples,
        len(shards),
        encoding,
        manifest.num_classes,
        *manifest.image_size,
        dt,
        f"; skipped {len(skipped)} corrupt file(s), listed in the manifest" if skipped else "",
    )
    return manifest


def default_out(cfg: BuildConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    name = {"cifar": cfg.cifar.variant, "folder": cfg.folder.name, "imagenet": f"imagenet{cfg.imagenet.num_classes}"}
    return Path("shards") / name.get(cfg.source, cfg.source)


def stale_splits(cfg: BuildConfig) -> List[Path]:
    """The splits of ``cfg`` that hold a finished shard set built from *other* inputs or settings (e.g. by an older
    synthetic generator): their manifest's fingerprint is not the one ``cfg`` would write now."""
    out, stale = default_out(cfg), []
    for split in cfg.splits:
        folder = out / split
        if (folder / "manifest.json").is_file():
            source = make_source(cfg, split)
            if load_manifest(folder).provenance.get("fingerprint") != _fingerprint(cfg, split, source.items()):
                stale.append(folder)
    return stale


def stale_message(cfg: BuildConfig, config_path: str) -> str:
    """'' when every finished split of ``cfg`` is what it builds now; else the error to show, naming the rebuild."""
    stale = stale_splits(cfg)
    if not stale:
        return ""
    return (
        f"{', '.join(map(str, stale))} was built from other settings or an older generator than {config_path}; "
        f"rebuild it: uedist shards build --config {config_path} overwrite=true"
    )


def build_shard_sets(cfg: BuildConfig, *, progress: bool = True) -> Dict[str, Manifest]:
    """Build every split of ``cfg``; returns {split: manifest}. Folders: ``<out>/<split>``."""
    out = default_out(cfg)
    return {split: build_split(cfg, split, out / split, progress=progress) for split in cfg.splits}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, desc: str, *, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="shard", dynamic_ncols=True)
