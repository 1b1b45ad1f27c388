"""The shard map pass: the one distributed "dataset -> dataset" engine (docs/architecture.md).

Given an input shard set and a batched function ``fn(images, labels, keys) -> images`` (uint8 (B, 3, H, W) on the
device in and out), each rank takes shards i ≡ rank (mod world), streams them in key-ordered batches, and writes
output shard i with the same keys and labels, losslessly. Output shards are written under temporary names and
recorded when complete; a rerun skips the recorded shards (so a killed pass resumes by shard), and rank 0 writes
the manifest last, once every rank is done. Needs no collective until then.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from uedist.data.images import LOSSLESS, encode_image
from uedist.data.loaders import make_map_loader
from uedist.data.manifest import Manifest, ManifestError, load_manifest, provenance
from uedist.data.shards import Sample, ShardSetWriter, shard_info_from_record
from uedist.dist import get_logger
from uedist.engine.stats import RunningSums

log = get_logger(__name__)

MapFn = Callable[[torch.Tensor, torch.Tensor, List[str]], torch.Tensor]
ExtrasFn = Callable[[torch.Tensor, torch.Tensor], List[Dict[str, bytes]]]


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def run_map_pass(
    src: Path,
    dst: Path,
    fn: MapFn,
    *,
    accelerator: Any,
    stage: str,
    config: Dict[str, Any],
    batch_size: int = 256,
    encoding: str = "png",
    num_workers: int = 2,
    extra: Optional[Dict[str, Any]] = None,
    extras_fn: Optional[ExtrasFn] = None,
    overwrite: bool = False,
    parents: Sequence[str] = (),
    progress: bool = True,
    aux: Optional[Path] = None,
    stats: Sequence[RunningSums] = (),
) -> Manifest:
    """Apply ``fn`` to every sample of ``src`` and write the result as the shard set ``dst``; returns its manifest.

    ``extras_fn(inputs, outputs)`` may add per-sample fields (e.g. the int8 noise as ``noise.npy``).
    ``config`` (the stage's resolved config) goes into the provenance and the resume fingerprint. With ``aux``
    (a shard set sharded like ``src``), ``fn`` gets a fourth argument: aux's images for the same keys.
    ``stats``: the running sums ``fn`` updates; taken at each shard's end into its record and combined over all
    shards into the manifest (``extra["map_pass"]``), then set as their totals, so that a resumed pass (or one
    already complete) reports the whole set, and the pass time summed over every run."""
    if encoding not in LOSSLESS:
        raise ValueError(f"map passes write perturbed images: encoding must be lossless {LOSSLESS}, got {encoding!r}")
    src_m = load_manifest(src)
    fp = _fingerprint(stage, config, src_m, encoding=encoding, aux=load_manifest(aux) if aux is not None else None)
    rank, world = accelerator.process_index, accelerator.num_processes
    done_m = None if overwrite else _finished(dst, fp)  # overwrite: whatever is there is rebuilt, never refused
    if done_m is not None:
        log.info("%s: already complete (%d samples), reusing it", dst, done_m.num_samples)
        return _set_totals(done_m, stats)
    if rank == 0:
        ShardSetWriter(dst, fp, overwrite=overwrite)  # checks the folder, clears it on overwrite
    accelerator.wait_for_everyone()
    writer = ShardSetWriter.attach(dst, fp)
    mine = [i for i in range(len(src_m.shards)) if i % world == rank]
    todo = [i for i in mine if writer.done(i) is None]
    if len(todo) < len(mine):
        log.info(
            "%s: rank %d resumes, %d of its %d shards already written", dst, rank, len(mine) - len(todo), len(mine)
        )
    _process(
        src,
        src_m,
        writer,
        fn=fn,
        todo=todo,
        accelerator=accelerator,
        batch_size=batch_size,
        encoding=encoding,
        num_workers=num_workers,
        extras_fn=extras_fn,
        progress=progress,
        aux=aux,
        stats=stats,
    )
    accelerator.wait_for_everyone()
    if rank == 0:
        sources = [str(Path(src).resolve()), *([str(Path(aux).resolve())] if aux else []), *parents]
        out = _output_manifest(
            dst,
            src_m,
            writer,
            encoding=encoding,
            prov={**provenance(stage, config, sources), "fingerprint": fp},
            extra=extra,
        )
        writer.finalize(out)
        log.info("%s: wrote %d samples in %d shards (%s)", dst, out.num_samples, len(out.shards), stage)
    accelerator.wait_for_everyone()
    return _set_totals(load_manifest(dst), stats)


def pass_seconds(m: Manifest, accelerator: Any, fallback: float) -> float:
    """A finished map pass's time over every run of it: the seconds each shard took as it was written, summed,
    over the ranks (``fallback``, e.g. this run's time, for a set written before shards recorded it)."""
    shard_s = m.extra.get("map_pass", {}).get("shard_seconds")
    return shard_s / accelerator.num_processes if shard_s is not None else fallback


def _set_totals(m: Manifest, stats: Sequence[RunningSums]) -> Manifest:
    saved = m.extra.get("map_pass", {}).get("stats")
    if stats and saved is not None and len(saved) == len(stats):
        for s, t in zip(stats, saved):
            s.set_totals(t)
    return m


def _output_manifest(
    dst: Path, src_m: Manifest, writer: ShardSetWriter, *, encoding: str, prov: Dict[str, Any], extra: Any
) -> Manifest:
    """The finished set's manifest from every shard's record (all must be written, every sample accounted for)."""
    records = [writer.done(i) for i in range(len(src_m.shards))]
    missing = [src_m.shards[i].name for i, r in enumerate(records) if r is None]
    if missing:
        raise RuntimeError(f"{dst}: shards not written by any rank: {missing[:5]}")
    shards = [shard_info_from_record(r) for r in records]  # type: ignore[arg-type]
    parts = [r.get("stats", []) for r in records]  # type: ignore[union-attr]
    pass_info = {
        "stats": [RunningSums.combine(col) for col in zip(*parts)] if all(parts) else [],
        "shard_seconds": sum(float(r.get("seconds", 0.0)) for r in records),  # type: ignore[union-attr]
    }
    out = Manifest(
        dataset=src_m.dataset,
        split=src_m.split,
        classes=src_m.classes,
        image_size=src_m.image_size,
        encoding=encoding,
        shards=shards,
        num_samples=sum(s.count for s in shards),
        class_counts=src_m.class_counts,
        provenance=prov,
        extra={**src_m.extra, **(extra or {}), "map_pass": pass_info},
    )
    if out.num_samples != src_m.num_samples:
        raise RuntimeError(f"{dst}: wrote {out.num_samples} samples, the input has {src_m.num_samples}")
    return out


def _process(
    src: Path,
    m: Manifest,
    writer: ShardSetWriter,
    *,
    fn: MapFn,
    todo: List[int],
    accelerator: Any,
    batch_size: int,
    encoding: str,
    num_workers: int,
    extras_fn: Optional[ExtrasFn],
    progress: bool,
    aux: Optional[Path],
    stats: Sequence[RunningSums] = (),
) -> None:
    if not todo:
        return
    from tqdm import tqdm

    device = accelerator.device
    log_lines = not progress and accelerator.is_main_process  # batch jobs: a line per shard instead of a bar
    t0, done_imgs, done_shards = time.perf_counter(), 0, 0
    t_shard = t0
    pending: Dict[int, List[Sample]] = {}
    total = sum(m.shards[i].count for i in todo)
    bar = tqdm(
        total=total,
        desc=f"map pass rank {accelerator.process_index}",
        unit="img",
        dynamic_ncols=True,
        disable=not (progress and accelerator.is_main_process),
    )
    loader = make_map_loader(
        src,
        batch_size=batch_size,
        rank=0,
        world_size=1,
        num_workers=num_workers,
        shards=todo,
        pin_memory=device.type == "cuda",
        aux=aux,
    )
    with ThreadPoolExecutor(max_workers=4) as pool:  # PNG encoding releases the GIL
        for batch in loader:
            shard = batch["shard"]
            samples = pending.setdefault(shard, [])
            if batch["key"]:
                samples += _map_batch(
                    batch,
                    fn,
                    device=device,
                    encoding=encoding,
                    extras_fn=extras_fn,
                    pool=pool,
                    with_aux=aux is not None,
                )
                bar.update(len(batch["key"]))
            if batch["last"]:
                written = pending.pop(shard)
                now = time.perf_counter()
                writer.write_shard(shard, written, stats=[s.take() for s in stats], seconds=now - t_shard)
                t_shard = now
                done_imgs, done_shards = done_imgs + len(written), done_shards + 1
                if log_lines:
                    log.info(
                        "map pass rank %d: %s written, %d/%d shards, %d/%d images, %.1f img/s",
                        accelerator.process_index,
                        m.shards[shard].name,
                        done_shards,
                        len(todo),
                        done_imgs,
                        total,
                        done_imgs / max(time.perf_counter() - t0, 1e-9),
                    )
    bar.close()
    if pending:
        raise RuntimeError(f"shards {sorted(pending)} ended without their last batch")


def _map_batch(
    batch: Dict[str, Any],
    fn: MapFn,
    *,
    device: torch.device,
    encoding: str,
    extras_fn: Optional[ExtrasFn],
    pool: Any,
    with_aux: bool,
) -> List[Sample]:
    """``fn`` on one batch (with aux's images as a fourth argument when the loader read them), checked to return
    uint8 of the input's shape, encoded (in ``pool``'s threads) as this batch's output samples."""
    x = batch["image"].to(device, non_blocking=True)
    y = batch["label"].to(device, non_blocking=True)
    if with_aux:
        out = fn(x, y, batch["key"], batch["aux_image"].to(device, non_blocking=True))
    else:
        out = fn(x, y, batch["key"])
    if out.dtype != torch.uint8 or out.shape != x.shape:
        raise ValueError(f"map function returned {out.dtype} {tuple(out.shape)}, expected uint8 {tuple(x.shape)}")
    extras = extras_fn(x, out) if extras_fn else [{} for _ in batch["key"]]
    arrs = out.permute(0, 2, 3, 1).cpu().numpy()
    blobs = list(pool.map(lambda a: encode_image(a, encoding), arrs))
    return [
        Sample(k, int(lbl), encoding, b, e)
        for k, lbl, b, e in zip(batch["key"], batch["label"].tolist(), blobs, extras)
    ]


def _finished(dst: Path, fp: str) -> Optional[Manifest]:
    if not (Path(dst) / "manifest.json").is_file():
        return None
    m = load_manifest(dst)
    if m.provenance.get("fingerprint") != fp:
        raise ManifestError(  # bad input (exit 2); the stage configs have no overwrite key: say what works
            f"{dst} holds a finished shard set made from other inputs or settings; nothing was changed. Write to "
            f"another folder (another name=, or out=...), or delete {dst} to rebuild it"
        )
    return m


def _fingerprint(stage: str, config: Dict[str, Any], src: Manifest, *, encoding: str, aux: Optional[Manifest]) -> str:
    blob = json.dumps(
        {
            "stage": stage,
            "config": config,
            "encoding": encoding,
            "src": [s.sha256 for s in src.shards],
            "aux": [s.sha256 for s in aux.shards] if aux else None,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()
