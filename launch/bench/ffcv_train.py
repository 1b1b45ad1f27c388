"""FFCV against the shard stream as a training feed (not a test): images/s delivered to a victim's training step
(loader -> uint8 -> [0, 1] -> the victim's own augmentation), one loader worker, at 32 and 256 px.

    python launch/bench/ffcv_train.py [--out runs/bench/ffcv_train] [--min-time 10] [--quick]

Sets: 32 px, the CIFAR-10 sample ``shards/cifar10_jpg/train`` (10,000 JPEGs; build it with ``uedist shards build
source=cifar cifar.root=../shared/data/cifar10_jpg out=shards/cifar10_jpg``); 256 px, the ImageNet sample
(``../shared/data/imagenet100_sample``: 100 photos, one per class, built here as 256 px JPEG q95 shards). Either
missing, or ``--quick``: a synthetic JPEG set of that size. Each set's beton is written under ``<out>/data`` by
``convert_to_beton`` (what ``uedist shards to-ffcv`` runs) and checked against the set as a job checks it.

The two feeds are the ones ``data.format`` picks: ``shards`` = ``make_train_loader`` (the victim's shuffle buffer
of 2,000, 1 DataLoader worker process, JPEG decoded per sample), ``ffcv`` = ``make_ffcv_train_loader`` (RANDOM
order, raw pixels, 1 numba thread in this process). Then, in this process at ``--torch-threads`` (1), what the
victim does: ``to_unit`` and crop + flip (pad 4) at 32 px, random-resized-crop 224 + flip at 256 px. Method: a
stream is warmed up (shards: 4 batches; FFCV: one whole epoch, which compiles its pipeline), then timed from one
batch's arrival until ``--min-time`` seconds have passed, counting the images of the batches after it. Writes
``<out>/ffcv_train.json`` and ``<out>/ffcv_train.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from uedist.bench.fixtures import build_synthetic_set
from uedist.bench.report import markdown_table, write_report
from uedist.bench.timing import machine_info
from uedist.config import load_config
from uedist.data.build import BuildConfig, build_shard_sets
from uedist.data.ffcv_io import check_beton, convert_to_beton, make_ffcv_train_loader
from uedist.data.loaders import make_train_loader
from uedist.data.manifest import load_manifest
from uedist.ops import augment
from uedist.ops.images import to_unit

BATCH = {32: 128, 256: 32}  # the victim configs' batch at 32 px; a 256 px one that leaves 3 FFCV steps of 100 photos


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench/ffcv_train", help="where ffcv_train.json / .md and data/ go")
    p.add_argument("--cifar", default="shards/cifar10_jpg/train", help="the 32 px shard set")
    p.add_argument("--imagenet", default="../shared/data/imagenet100_sample", help="the 256 px photos (ImageFolder)")
    p.add_argument("--min-time", type=float, default=10.0, help="seconds timed per cell of the table")
    p.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of the consuming process")
    p.add_argument("--quick", action="store_true", help="tiny synthetic sets, 1 s per feed: a smoke run")
    return p.parse_args(argv)


def shard_sets(args: argparse.Namespace, data: Path) -> dict[int, tuple[Path, str]]:
    """{px: (train shard set, what it is)}, built under ``data`` where needed."""
    sets: dict[int, tuple[Path, str]] = {}
    cifar = Path(args.cifar)
    if not args.quick and (cifar / "manifest.json").is_file():
        sets[32] = (cifar, "CIFAR-10 sample (JPEG)")
    else:
        n = 512 if args.quick else 10000
        sets[32] = (
            build_synthetic_set(data / f"synth32_n{n}", num_train=n, size=32, shard_size=128, encoding="jpg"),
            "synthetic (JPEG)",
        )
    photos = Path(args.imagenet)
    if not args.quick and (photos / "train").is_dir():
        out = data / "imagenet_sample256"
        if not (out / "train" / "manifest.json").is_file():
            over = [f"out={out}", "source=imagenet", f"imagenet.root={photos}", "splits=[train]", "shard_size=25"]
            build_shard_sets(load_config(BuildConfig, None, [*over, "jpeg_quality=95", "workers=2"]), progress=False)
        sets[256] = (out / "train", "ImageNet sample, 100 photos (JPEG q95)")
    else:
        n = 64 if args.quick else 512
        sets[256] = (
            build_synthetic_set(data / f"synth256_n{n}", num_train=n, size=256, shard_size=16, encoding="jpg"),
            "synthetic (JPEG)",
        )
    return sets


def victim_augment(px: int, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """The victim's train-time augmentation at ``data.augment: auto`` on a uint8 (B, 3, H, W) batch -> [0, 1]."""
    if px <= 64:
        return lambda x: augment.random_crop_flip(to_unit(x), pad=4, gen=gen)
    return lambda x: augment.random_resized_crop_flip(to_unit(x), round(px * 7 / 8), gen=gen)


def feed_rate(batches: Iterable, tf: Callable, *, warm: int, min_time: float) -> dict[str, float]:
    """Steady-state images/s of ``tf`` over the stream ``batches``: ``warm`` batches first, then timed from one
    batch's arrival until ``min_time`` s have passed (that batch not counted)."""
    t0 = time.perf_counter()
    it = iter(batches)
    for _ in range(warm):
        tf(next(it)["image"])
    setup = time.perf_counter() - t0
    tf(next(it)["image"])
    start = time.perf_counter()
    images = 0
    while time.perf_counter() - start < min_time:
        b = next(it)
        tf(b["image"])
        images += len(b["label"])
    spent = time.perf_counter() - start
    close = getattr(it, "close", None)
    if close is not None:
        close()
    del it
    return {"images_per_s": images / spent, "timed_images": images, "timed_s": spent, "warmup_s": setup}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args: argparse.Namespace) -> dict[str, Any]:
    min_time = 1.0 if args.quick else args.min_time
    data = Path(args.out) / "data"
    torch.set_num_threads(args.torch_threads)
    results: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    for px, (folder, what) in shard_sets(args, data).items():
        m = load_manifest(folder)
        bs = BATCH[px]
        t = time.perf_counter()
        beton = check_beton(folder, convert_to_beton(folder, data / f"{px}px.beton", num_workers=1))
        print(f"{folder}: {what}, {m.num_samples} images, beton ready in {time.perf_counter() - t:.0f} s", flush=True)
        epoch = m.num_samples // bs
        feeds = {
            "shards": (partial(make_train_loader, folder, shuffle_buffer=2000), 4),
            "ffcv": (partial(make_ffcv_train_loader, beton), epoch + 1),
        }
        for name, (make, warm) in feeds.items():
            for aug in (False, True):
                tf = victim_augment(px, torch.Generator().manual_seed(0)) if aug else to_unit
                batches = make(batch_size=bs, num_steps=10**6, num_workers=1)
                r = feed_rate(batches, tf, warm=warm, min_time=min_time)
                row = {"feed": name, "augment": aug, "px": px, "set": what, "images": m.num_samples, "batch_size": bs}
                results.append({**row, **r})
                print(f"  {name:<7} {px:>3} px  augment {aug!s:<5} {r['images_per_s']:8.0f} img/s", flush=True)
    machine = {
        **machine_info(torch.device("cpu")),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "platform": platform.platform(),
    }
    settings = {"quick": args.quick, "min_time_s": min_time, "torch_threads": args.torch_threads, "workers": 1}
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = "python launch/bench/ffcv_train.py " + " ".join(sys.argv[1:])
    return {"date": when, "command": command.strip(), "machine": machine, "settings": settings, "results": results}


def to_markdown(report: dict[str, Any]) -> str:
    rate = {(r["px"], r["feed"], r["augment"]): r["images_per_s"] for r in report["results"]}
    rows = []
    for px, what, bs in sorted({(r["px"], r["set"], r["batch_size"]) for r in report["results"]}):
        for feed in ("shards", "ffcv"):
            got = [rate.get((px, feed, aug)) for aug in (False, True)]
            base = [rate.get((px, "shards", aug)) for aug in (False, True)]
            cells = [f"{g:.0f}" if g else "—" for g in got]
            ratio = [f"{g / b:.2f}" if g and b else "—" for g, b in zip(got, base)]
            rows.append((px, what, bs, f"`{feed}`", cells[0], ratio[0], cells[1], ratio[1]))
    header = [
        "px",
        "set",
        "batch",
        "data.format",
        "loader only, img/s",
        "× shards",
        "+ augmentation, img/s",
        "× shards",
    ]
    lines = markdown_table(header, rows, "rlrlrrrr")
    m, st = report["machine"], report["settings"]
    note = (
        f"\n`{report['command']}`, {report['date']}; {m['cpu']}, {m['cpus']} CPUs (load average "
        f"{m['load_average_before'][0]:.1f} before, {m['load_average_after'][0]:.1f} after), Python {m['python']}, "
        f"torch {m['torch']}, {st['torch_threads']} torch thread(s) in the consuming process; 1 loader worker each; "
        f"{st['min_time_s']:.0f} s timed per cell after warm-up.\n"
    )
    return "\n".join(lines) + "\n" + note


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    report = run(args)
    report["wall_s"] = time.perf_counter() - t0
    md = to_markdown(report)
    paths = write_report(Path(args.out), "ffcv_train", report, markdown=md)
    print("\n" + md + "wrote " + " and ".join(map(str, paths)) + f" ({report['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
