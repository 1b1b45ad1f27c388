"""Loaders over shard sets: the resampled training stream and the ordered map-pass reader.

**Training stream** (``make_train_loader``): WebDataset-style — each rank's stream picks shards at random
with replacement, reads each sequentially, and passes samples through a shuffle buffer; it yields exactly
``num_steps`` batches per rank, so ranks never disagree on the step count whatever the shard sizes. Which
sample comes next depends only on the seed and the shard counts, never on the bytes, so the stream can be
fast-forwarded to any step without decoding (exact resume: ``start_step``), then re-reads only the shards that
hold the samples still in its buffer. The stream does not depend on the number of loader workers: each worker
replays the rank's positions and decodes only the batches it serves, so a run resumed with other ``data.workers``
(other hardware) reads the batches the uninterrupted run would have read.

**Map-pass reader** (``make_map_loader``): shard i goes to rank i mod world (then worker j mod workers within the
rank); batches never cross a shard and come in key order, each tagged with its shard index and whether it is the
shard's last batch — what a shard map pass needs to write output shard i.

Batches are dicts: ``image`` uint8 (B, 3, H, W), ``label`` int64 (B,), ``key`` list of B strings (+ ``shard``,
``last`` for the map reader). Normalization happens on the device (``uedist.ops.images.normalize``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from uedist.data.images import decode_image
from uedist.data.manifest import Manifest, load_manifest
from uedist.data.shards import Sample, read_shard

PathLike = Union[str, os.PathLike]
Pos = Tuple[int, int, int]  # (shard visit number, shard index, offset within the shard)


def _collate(samples: Sequence[Sample], m: Manifest, where: str) -> Dict[str, object]:
    imgs = [decode_image(s.data, s.ext, m.image_size, name=f"{where}:{s.key}") for s in samples]
    return {
        "image": torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(),  # (B, 3, H, W) uint8
        "label": torch.tensor([s.label for s in samples], dtype=torch.int64),
        "key": [s.key for s in samples],
    }


class _PositionStream:
    """The order of a resampled, buffer-shuffled stream, as positions only (no data).

    Events: ("enter", pos) when a sample is read into the buffer, ("emit", pos) when it leaves it. Draws from
    ``rng`` happen in the same order whether or not the data is read, so replaying the events reproduces the
    stream exactly.
    """

    def __init__(self, counts: Sequence[int], rng: np.random.Generator, buffer_size: int) -> None:
        self.counts = np.asarray(counts)
        self.nonempty = np.flatnonzero(self.counts > 0)
        if len(self.nonempty) == 0:
            raise ValueError("shard set has no samples")
        self.rng, self.buffer_size = rng, max(1, buffer_size)
        self.buffer: List[Pos] = []
        self.visit = -1
        self.shard, self.offset = -1, 0

    def _next_entry(self) -> Pos:
        if self.visit < 0 or self.offset >= self.counts[self.shard]:
            self.visit += 1
            self.shard, self.offset = int(self.nonempty[self.rng.integers(len(self.nonempty))]), 0
        pos = (self.visit, self.shard, self.offset)
        self.offset += 1
        return pos

    def events(self) -> Iterator[Tuple[str, Pos]]:
        while True:
            pos = self._next_entry()
            yield "enter", pos
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(pos)
                continue
            j = int(self.rng.integers(len(self.buffer)))
            out, self.buffer[j] = self.buffer[j], pos
            yield "emit", out


class TrainStream(IterableDataset):
    """Per-rank resampled stream of ``num_steps`` batches (see the module docstring). Use ``make_train_loader``."""

    def __init__(
        self,
        folder: PathLike,
        *,
        batch_size: int,
        num_steps: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        start_step: int = 0,
        verify: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        if self.manifest.num_samples == 0:
            raise ValueError(f"{self.folder}: shard set is empty")
        self.batch_size, self.num_steps, self.seed = batch_size, num_steps, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.start_step, self.verify = shuffle_buffer, start_step, verify

    def __iter__(self) -> Iterator[Dict[str, object]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # One stream per rank, whatever the worker count: every worker replays its positions (RNG draws only) and
        # reads its shards' raw bytes, and decodes only the batches it serves (steps start + w, start + w + nw, ...,
        # the order in which the DataLoader takes them from its workers). So a run's batches, and so its result,
        # do not depend on data.workers: a job killed with 0 workers resumes with 8 to the same weights.
        rng = np.random.default_rng([self.seed, self.rank, 0x5EED])
        stream = _PositionStream([s.count for s in self.manifest.shards], rng, self.shuffle_buffer)
        events = stream.events()
        skip = self.start_step * self.batch_size
        while skip > 0:  # fast-forward: positions only
            kind, _ = next(events)
            skip -= kind == "emit"
        cache = self._reload(stream.buffer, stream)
        reader: Optional[Iterator[Sample]] = None
        reader_visit = -1
        if stream.visit >= 0 and stream.offset < stream.counts[stream.shard]:
            reader = self._open(stream.shard, skip=stream.offset)
            reader_visit = stream.visit
        for step in range(self.start_step, self.num_steps):
            mine = (step - self.start_step) % nw == w
            batch: List[Sample] = []
            got = 0
            while got < self.batch_size:
                kind, pos = next(events)
                if kind == "enter":
                    if reader_visit != pos[0]:
                        reader, reader_visit = self._open(pos[1]), pos[0]
                    cache[pos] = next(reader)  # type: ignore[arg-type]
                else:
                    sample = cache.pop(pos)
                    got += 1
                    if mine:
                        batch.append(sample)
            if mine:
                yield _collate(batch, self.manifest, str(self.folder))

    def _open(self, shard: int, skip: int = 0) -> Iterator[Sample]:
        it = read_shard(
            self.folder, self.manifest.shards[shard], verify=self.verify, num_classes=self.manifest.num_classes
        )
        for _ in range(skip):
            next(it)
        return it

    def _reload(self, positions: Sequence[Pos], stream: _PositionStream) -> Dict[Pos, Sample]:
        """After a fast-forward: read back the samples still in the buffer (grouped by shard visit)."""
        by_visit: "OrderedDict[int, List[Pos]]" = OrderedDict()
        for p in sorted(positions):
            by_visit.setdefault(p[0], []).append(p)
        cache: Dict[Pos, Sample] = {}
        for visit, ps in by_visit.items():
            want = {p[2]: p for p in ps}
            for off, s in enumerate(self._open(ps[0][1])):
                if off in want:
                    cache[want.pop(off)] = s
                if not want:
                    break
        return cache


class MapReader(IterableDataset):
    """Ordered reader for a shard map pass (see the module docstring). Use ``make_map_loader``."""

    def __init__(
        self,
        folder: PathLike,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shards: Optional[Sequence[int]] = None,
        verify: bool = True,
        aux: Optional[PathLike] = None,
    ) -> None:
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        self.aux = Path(aux) if aux is not None else None
        self.aux_manifest = load_manifest(self.aux) if self.aux is not None else None
        if self.aux_manifest is not None and [s.count for s in self.aux_manifest.shards] != [
            s.count for s in self.manifest.shards
        ]:
            raise ValueError(f"{self.aux} is not sharded like {self.folder} (a map pass output of it is)")
        self.batch_size, self.verify = batch_size, verify
        mine = [i for i in range(len(self.manifest.shards)) if i % world_size == rank]
        self.shards = [i for i in mine if shards is None or i in set(shards)]

    def __iter__(self) -> Iterator[Dict[str, object]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for j, shard in enumerate(self.shards):
            if j % nw != w:
                continue
            n = self.manifest.num_classes
            samples = list(read_shard(self.folder, self.manifest.shards[shard], verify=self.verify, num_classes=n))
            keys = [s.key for s in samples]  # in order: read_shard checks it
            aux = None
            if self.aux is not None:
                aux = list(read_shard(self.aux, self.aux_manifest.shards[shard], verify=self.verify, num_classes=n))
                if [s.key for s in aux] != keys:
                    raise ValueError(
                        f"{self.aux / self.aux_manifest.shards[shard].name}: keys differ from {self.folder}"
                    )
            if not samples:
                yield {"image": None, "label": None, "key": [], "shard": shard, "last": True}
            for b in range(0, len(samples), self.batch_size):
                chunk = samples[b : b + self.batch_size]
                batch = _collate(chunk, self.manifest, str(self.folder))
                batch.update(shard=shard, last=b + self.batch_size >= len(samples))
                if aux is not None:
                    batch["aux_image"] = _collate(aux[b : b + self.batch_size], self.aux_manifest, str(self.aux))[
                        "image"
                    ]
                yield batch


def make_train_loader(
    folder: PathLike,
    *,
    batch_size: int,
    num_steps: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    start_step: int = 0,
    pin_memory: bool = False,
    verify: bool = True,
) -> DataLoader:
    """A DataLoader yielding ``num_steps - start_step`` training batches for this rank (exactly resumable)."""
    ds = TrainStream(
        folder,
        batch_size=batch_size,
        num_steps=num_steps,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        start_step=start_step,
        verify=verify,
    )
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )


def make_map_loader(
    folder: PathLike,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shards: Optional[Sequence[int]] = None,
    pin_memory: bool = False,
    verify: bool = True,
    aux: Optional[PathLike] = None,
) -> DataLoader:
    """A DataLoader over this rank's shards (i mod world == rank), batches in key order, tagged with the shard.
    With ``aux`` (a shard set sharded like ``folder``, e.g. a map pass output of it), each batch also carries
    ``aux_image``: the aux set's images for the same keys."""
    ds = MapReader(
        folder, batch_size=batch_size, rank=rank, world_size=world_size, shards=shards, verify=verify, aux=aux
    )
    return DataLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
