"""Loader throughput benchmark (not a test): images/s of every way uedist can feed a model, against the
machine's single-core decode rate.

    python launch/bench/loader.py [--out runs/bench/loader] [--quick]

Builds (or reuses, under ``<out>/data``) synthetic shard sets at 32 px and 256 px in JPEG and PNG, a plain
``<class>/<key>.<ext>`` image folder holding the same encoded bytes, and an FFCV beton (raw pixels) when ffcv is
installed. Measures, at 0/1/2 workers: the WebDataset training stream (``make_train_loader``), the ordered map
reader (``make_map_loader``), a plain-folder PIL ``Dataset`` + ``DataLoader``, and FFCV (1/2 numba threads);
plus PIL decoding of the same bytes in a loop in one process — the per-core limit a decoding loader can reach.

Method: each loader is created and warmed up first (2 batches; FFCV: one full epoch, which includes its numba
compile). Then whole epochs run until ``min_time`` s have been timed; a pass is timed from the arrival of its
first batch to the arrival of its last, and its first batch is not counted, so worker start-up (reported
separately as ``first_batch_s``) is excluded. With w workers up to ~w batches may already be waiting when the
clock starts, so rates with workers read a few percent high. Writes ``<out>/loader.json`` and ``<out>/loader.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from uedist.bench.fixtures import build_synthetic_set
from uedist.bench.report import markdown_table, write_report
from uedist.bench.timing import machine_info
from uedist.data.loaders import make_map_loader, make_train_loader
from uedist.data.manifest import load_manifest
from uedist.data.shards import iter_samples
from uedist.io import atomic_write_text

# (images, shard size, batch size) per resolution; shards >= 8 so 2 workers never run dry.
FULL = {32: (2048, 256, 64), 256: (512, 64, 32)}
QUICK = {32: (512, 64, 64), 256: (128, 16, 16)}
ENCODINGS = ("jpg", "png")
WORKERS = (0, 1, 2)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench/loader", help="where loader.json / loader.md go")
    p.add_argument("--data", default=None, help="where the benchmark data is built/reused (default <out>/data)")
    p.add_argument("--quick", action="store_true", help="fewer images and shorter timing (< 2 minutes)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads of this (the consuming) process; DataLoader workers always use 1. "
        "1 by default: on a 2-vCPU VM, 2 OpenMP threads make the uint8 collate copies of "
        "workers=0 loaders erratically 10-50x slower (idle-thread wake-ups)",
    )
    return p.parse_args(argv)


class PlainFolder(Dataset):
    """``root/<class>/<file>`` images decoded with PIL -> {"image": uint8 (3, H, W), "label": int}: the plain
    ``ImageFolder``-style baseline the shard loaders are compared with."""

    def __init__(self, root: Path) -> None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.files[i]
        with Image.open(path) as img:
            arr = np.array(img.convert("RGB"))  # writable copy, as torch wants
        return {"image": torch.from_numpy(arr).permute(2, 0, 1), "label": label}


def loader_rate(make: Callable[[], Iterable], *, min_time: float, warm_epoch: bool = False) -> dict[str, float]:
    """Steady-state images/s of a re-iterable loader of ``{"label": (B,), ...}`` batches. ``make()`` builds it; it
    is warmed up (2 batches, or a whole epoch with ``warm_epoch``: FFCV compiles then), then whole epochs run
    until ``min_time`` s are timed. An epoch is timed from the arrival of its first batch to that of its last and
    its first batch is not counted, so worker start-up (``first_batch_s``, the median) is excluded. (Per batch
    arrival, not per call: the one rate in the benchmarks not timed by ``uedist.bench.timing``.)"""
    t0 = time.perf_counter()
    loader = make()
    for i, _ in enumerate(loader):
        if i == 1 and not warm_epoch:
            break
    setup = time.perf_counter() - t0
    images, spent, firsts = 0, 0.0, []
    while spent < min_time or not firsts:
        start = time.perf_counter()
        first = last = None
        for batch in loader:
            last = time.perf_counter()
            if first is None:
                first = last
                firsts.append(first - start)
            else:
                images += len(batch["label"])
        spent += last - first  # type: ignore[operator]
    return {
        "images_per_s": images / spent if spent > 0 else float("nan"),
        "first_batch_s": float(np.median(firsts)),
        "timed_images": images,
        "timed_s": spent,
        "setup_s": setup,
    }


def write_plain_folder(shards: Path) -> Path:
    """``<set>/folder/<class>/<key>.<ext>``: the shard set's encoded bytes as files (same images, same bytes)."""
    m = load_manifest(shards)
    out = shards.parent / "folder"
    stamp = json.dumps([s.sha256 for s in m.shards])
    marker = out / ".complete"
    if marker.is_file() and marker.read_text() == stamp:
        return out
    shutil.rmtree(out, ignore_errors=True)
    for s in iter_samples(shards, manifest=m):
        d = out / m.classes[s.label]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{s.key}.{s.ext}").write_bytes(s.data)
    atomic_write_text(marker, stamp)
    return out


def decode_limit(shards: Path, min_time: float) -> float:
    """PIL decodes per second of the set's own bytes, in a loop, in this one process."""
    blobs = [s.data for s in iter_samples(shards)]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        for b in blobs:
            with Image.open(io.BytesIO(b)) as img:
                np.asarray(img.convert("RGB"))
        n += len(blobs)
    return n / (time.perf_counter() - t0)


def ffcv_available() -> bool:
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    min_time = 0.3 if args.quick else 1.5
    data = Path(args.data) if args.data else Path(args.out) / "data"
    have_ffcv = ffcv_available()
    torch.set_num_threads(args.torch_threads)
    results: list[dict[str, Any]] = []
    limits: list[dict[str, Any]] = []

    def record(
        loader: str,
        make: Callable[[], Iterable],
        *,
        px: int,
        enc: str,
        workers: int,
        batch: int,
        warm_epoch: bool = False,
    ) -> None:
        r = loader_rate(make, min_time=min_time, warm_epoch=warm_epoch)
        results.append({"loader": loader, "px": px, "encoding": enc, "workers": workers, "batch_size": batch, **r})
        print(f"  {loader:<22} {px:>3}px {enc:<4} w={workers}  {r['images_per_s']:8.0f} img/s", flush=True)

    for px, (n, shard_size, bs) in sizes.items():
        for enc in ENCODINGS:
            t = time.perf_counter()
            shards = build_synthetic_set(
                data / f"synth{px}_{enc}_n{n}", num_train=n, size=px, shard_size=shard_size, encoding=enc, workers=2
            )
            folder = write_plain_folder(shards)
            print(f"{shards}: {n} images, {px}px {enc} (ready in {time.perf_counter() - t:.1f}s)", flush=True)
            limits.append({"px": px, "encoding": enc, "images_per_s": decode_limit(shards, min_time)})
            print(f"  {'PIL decode, 1 core':<22} {px:>3}px {enc:<4}      {limits[-1]['images_per_s']:8.0f} img/s")
            for w in WORKERS:
                at = {"px": px, "enc": enc, "workers": w, "batch": bs}
                record(
                    "wds train stream",
                    partial(make_train_loader, shards, batch_size=bs, num_steps=-(-n // bs), num_workers=w),
                    **at,
                )
                record("wds map reader", partial(make_map_loader, shards, batch_size=bs, num_workers=w), **at)
                record(
                    "plain folder (PIL)",
                    partial(DataLoader, PlainFolder(folder), batch_size=bs, shuffle=True, num_workers=w),
                    **at,
                )
        if have_ffcv:
            from uedist.data.ffcv_io import convert_to_beton, make_ffcv_loader

            beton = convert_to_beton(data / f"synth{px}_png_n{n}" / "train")
            for w in (1, 2):  # ffcv workers are numba threads in this process; 0 is not a setting
                record(
                    "ffcv (raw pixels)",
                    partial(make_ffcv_loader, beton, batch_size=bs, num_workers=w, order="random"),
                    px=px,
                    enc="raw",
                    workers=w,
                    batch=bs,
                    warm_epoch=True,
                )
    machine = {
        **machine_info(torch.device("cpu")),
        "cpus": os.cpu_count(),
        "pillow": PIL.__version__,
        "platform": platform.platform(),
    }
    settings = {
        "quick": args.quick,
        "sizes": {str(k): dict(zip(("images", "shard_size", "batch_size"), v)) for k, v in sizes.items()},
        "min_time_s": min_time,
        "ffcv": have_ffcv,
        "torch_threads": args.torch_threads,
    }
    return {"machine": machine, "settings": settings, "results": results, "decode_limit": limits}


def to_markdown(report: dict[str, Any]) -> str:
    limit = {(d["px"], d["encoding"]): d["images_per_s"] for d in report["decode_limit"]}
    rows = [
        (
            "**PIL decode, 1 core (limit)**",
            d["px"],
            d["encoding"],
            "1 process",
            f"**{d['images_per_s']:.0f}**",
            "1.00",
            "",
        )
        for d in report["decode_limit"]
    ]
    for r in sorted(report["results"], key=lambda r: (r["px"], r["encoding"], r["loader"], r["workers"])):
        lim = limit.get((r["px"], r["encoding"]))
        rows.append(
            (
                r["loader"],
                r["px"],
                r["encoding"],
                f"{r['workers']} threads" if r["loader"].startswith("ffcv") else r["workers"],
                f"{r['images_per_s']:.0f}",
                f"{r['images_per_s'] / lim:.2f}" if lim else "—",
                f"{r['first_batch_s']:.2f}",
            )
        )
    lines = markdown_table(
        ["loader", "px", "encoding", "workers", "images/s", "× 1-core decode", "first batch (s)"], rows, "lrlrrrr"
    )
    m, st = report["machine"], report["settings"]
    note = (
        f"\n{m['cpus']} CPUs, Python {m['python']}, torch {m['torch']}, Pillow {m['pillow']}; "
        f"{st['torch_threads']} torch thread(s) in the consuming process; steady-state rate (first batch of "
        f"each epoch excluded); ffcv: {'yes' if st['ffcv'] else 'not installed'}.\n"
    )
    return "\n".join(lines) + "\n" + note


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    report = run(args)
    report["wall_s"] = time.perf_counter() - t0
    md = to_markdown(report)
    paths = write_report(Path(args.out), "loader", report, markdown=md)
    print("\n" + md + "wrote " + " and ".join(map(str, paths)) + f" ({report['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
