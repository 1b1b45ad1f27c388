"""Victim training throughput: images/s of one training step (forward + backward + SGD update) per model at
32 and 224 px, fp32 vs bf16 autocast, channels_last on/off, standard vs PGD adversarial training.

    python launch/bench/victim.py [--out runs/bench/victim] [--models resnet18,wrn34_10] [--quick]

Writes <out>/victim.json and <out>/victim.md. Full-width models; batch sizes small enough for a laptop CPU
(set --batch-32/--batch-224 on a GPU). Adversarial training uses the reference PGD (10 steps at 32 px, 8 at 224).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import uedist.models  # noqa: F401  (registration)
from uedist.bench.fixtures import random_batch
from uedist.bench.report import markdown_table, write_report
from uedist.bench.steps import classifier_step
from uedist.bench.timing import Setting, autocast_args, machine_info, timed_calls
from uedist.dist import make_accelerator
from uedist.models.wrappers import Normalized
from uedist.ops.images import IMAGENET_MEAN, IMAGENET_STD
from uedist.registry import MODELS


def bench_one(
    name: str,
    px: int,
    batch: int,
    *,
    bf16: bool,
    channels_last: bool,
    adv_steps: int,
    device: torch.device,
    min_time: float,
) -> dict[str, Any]:
    """One row: images/s of a training step of model ``name`` (standard, or PGD-``adv_steps`` adversarial)."""
    classes = 10 if px <= 64 else 100
    net = MODELS.build(name, num_classes=classes, stem="cifar" if px <= 64 else "imagenet")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = Normalized(net, IMAGENET_MEAN, IMAGENET_STD).to(device).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = random_batch(batch, px, 10, device=device, channels_last=channels_last)
    step = classifier_step(model, x, y, opt=opt, amp=autocast_args(device, bf16), adv_steps=adv_steps)
    dt, n = timed_calls(step, min_time)
    return {
        "model": name,
        "px": px,
        "batch": batch,
        "bf16": bf16,
        "channels_last": channels_last,
        "training": "adversarial" if adv_steps else "standard",
        "pgd_steps": adv_steps,
        "fwd_bwd_per_image": 1 + adv_steps,
        "iters": n,
        "images_per_s": batch / dt,
    }


def grid(args: argparse.Namespace) -> Iterator[tuple[str, int, int, int, bool, bool]]:
    """(model, px, batch, PGD steps, bf16, channels_last) of every row asked for."""
    for name in ["resnet18"] if args.quick else args.models.split(","):
        for px in (int(s) for s in args.sizes.split(",")):
            batch = 2 if args.quick else (args.batch_32 if px <= 64 else args.batch_224)
            for adv in (0, 10 if px <= 64 else 8):
                if adv and px > 64 and name not in args.adv_224_models.split(","):
                    continue  # full-width adversarial training at 224 px is minutes per step on a CPU
                for bf16, cl in ((False, False), (False, True), (True, True)):
                    # the full precision x layout matrix for ResNet-18; other models: fp32 and bf16+cl
                    if name == "resnet18" or (bf16, cl) != (False, True):
                        yield name, px, batch, adv, bf16, cl


def to_markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [f"Victim training step, images/s on {machine['device']} ({machine['threads']} threads), full width.", ""]
    lines += markdown_table(
        ["model", "px", "batch", "training", "precision", "channels_last", "fwd+bwd / image", "images/s"],
        [
            (
                r["model"],
                r["px"],
                r["batch"],
                r["training"],
                "bf16" if r["bf16"] else "fp32",
                "on" if r["channels_last"] else "off",
                r["fwd_bwd_per_image"],
                f"{r['images_per_s']:.1f}",
            )
            for r in rows
        ],
        "lrrlllrr",
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/victim")
    p.add_argument("--models", default="resnet18,resnet50,wrn34_10,densenet121,vgg16,mobilenetv2")
    p.add_argument("--sizes", default="32,224")
    p.add_argument("--batch-32", type=int, default=32)
    p.add_argument("--batch-224", type=int, default=8)
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--adv-224-models", default="resnet18", help="models also timed with adversarial training at 224 px")
    p.add_argument("--quick", action="store_true", help="resnet18 only, batch 2, one iteration each")
    args = p.parse_args(argv)
    device = make_accelerator().device
    min_time = Setting(device, quick=args.quick).min_time(args.min_time)
    rows = []
    for name, px, batch, adv, bf16, cl in grid(args):
        r = bench_one(
            name,
            px,
            batch,
            bf16=bf16,
            channels_last=cl,
            adv_steps=adv,
            device=device,
            min_time=min_time,
        )
        rows.append(r)
        print(
            f"{name:12s} {px:4d}px {r['training']:11s} {'bf16' if bf16 else 'fp32'} cl={int(cl)} "
            f"{r['images_per_s']:8.1f} img/s",
            flush=True,
        )
    machine = machine_info(device)
    md = to_markdown(rows, machine)
    paths = write_report(Path(args.out), "victim", {"machine": machine, "results": rows}, markdown=md)
    print(md + "wrote " + " and ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
