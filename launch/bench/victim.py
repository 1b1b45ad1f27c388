"""Victim training throughput: images/s of one training step (forward + backward + SGD update) per model at
32 and 224 px, fp32 vs bf16 autocast, channels_last on/off, standard vs PGD adversarial training.

    python launch/bench_victim.py [--out runs/bench/victim] [--models resnet18,wrn34_10] [--quick]

Writes <out>/victim.json and <out>/victim.md. Full-width models; batch sizes small enough for a laptop CPU
(set --batch-32/--batch-224 on a GPU). Adversarial training uses the reference PGD (10 steps at 32 px, 8 at 224).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

import uedist.models  # noqa: F401  (registration)
from uedist.io import atomic_write_json, atomic_write_text
from uedist.models.wrappers import Normalized
from uedist.ops.images import IMAGENET_MEAN, IMAGENET_STD
from uedist.ops.pgd import pgd
from uedist.registry import MODELS


def bench_one(name: str, px: int, batch: int, *, bf16: bool, channels_last: bool, adv_steps: int, device: torch.device,
              min_time: float, max_iters: int) -> Dict[str, Any]:
    stem = "cifar" if px <= 64 else "imagenet"
    model = Normalized(MODELS.build(name, num_classes=10 if px <= 64 else 100, stem=stem), IMAGENET_MEAN, IMAGENET_STD).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, px, px, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    def fwd(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(**amp):
            return model(z).float()

    def step() -> None:
        xi = x
        if adv_steps:
            for p in model.parameters():
                p.requires_grad_(False)
            xi = x + pgd(fwd, x, y, eps=4 / 255, alpha=1 / 255, steps=adv_steps)
            for p in model.parameters():
                p.requires_grad_(True)
        loss = F.cross_entropy(fwd(xi), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, oneDNN primitive cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while n < max_iters and (n == 0 or time.perf_counter() - t0 < min_time):
        step()
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    passes = 1 + adv_steps  # forward+backward passes per image per step
    return {"model": name, "px": px, "batch": batch, "bf16": bf16, "channels_last": channels_last,
            "training": "adversarial" if adv_steps else "standard", "pgd_steps": adv_steps,
            "fwd_bwd_per_image": passes, "iters": n, "images_per_s": batch * n / dt}


def to_markdown(rows: List[Dict[str, Any]], machine: Dict[str, Any]) -> str:
    lines = [f"Victim training step, images/s on {machine['device']} ({machine['threads']} threads), full width.", "",
             "| model | px | batch | training | precision | channels_last | fwd+bwd / image | images/s |",
             "|---|---:|---:|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['px']} | {r['batch']} | {r['training']} | {'bf16' if r['bf16'] else 'fp32'} | "
                     f"{'on' if r['channels_last'] else 'off'} | {r['fwd_bwd_per_image']} | {r['images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/victim")
    p.add_argument("--models", default="resnet18,resnet50,wrn34_10,densenet121,vgg16,mobilenetv2")
    p.add_argument("--sizes", default="32,224")
    p.add_argument("--batch-32", type=int, default=32)
    p.add_argument("--batch-224", type=int, default=8)
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--adv-224-models", default="resnet18", help="models also timed with adversarial training at 224 px")
    p.add_argument("--quick", action="store_true", help="resnet18 only, one iteration each")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = ["resnet18"] if args.quick else args.models.split(",")
    rows = []
    for name in models:
        for px in (int(s) for s in args.sizes.split(",")):
            batch = args.batch_32 if px <= 64 else args.batch_224
            for adv in (0, 10 if px <= 64 else 8):
                if adv and px > 64 and name not in args.adv_224_models.split(","):
                    continue  # full-width adversarial training at 224 px is minutes per step on a CPU
                for bf16, cl in ((False, False), (False, True), (True, True)):
                    # the full precision x layout matrix for ResNet-18; other models: fp32 and bf16+cl
                    if name != "resnet18" and (bf16, cl) == (False, True):
                        continue
                    r = bench_one(name, px, batch, bf16=bf16, channels_last=cl, adv_steps=adv, device=device,
                                  min_time=0 if args.quick else args.min_time, max_iters=1 if args.quick else 50)
                    rows.append(r)
                    print(f"{name:12s} {px:4d}px {r['training']:11s} {'bf16' if bf16 else 'fp32'} cl={int(cl)} "
                          f"{r['images_per_s']:8.1f} img/s", flush=True)
    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0]}
    out = Path(args.out)
    atomic_write_json(out / "victim.json", {"machine": machine, "results": rows})
    atomic_write_text(out / "victim.md", to_markdown(rows, machine))
    print(to_markdown(rows, machine))
    print(f"wrote {out / 'victim.json'} and {out / 'victim.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
