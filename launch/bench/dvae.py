"""Purifier throughput: D-VAE training and inference, and the baseline purifiers.

    python launch/bench_dvae.py [--out runs/bench/dvae] [--quick]

1. D-VAE, with the model of each reference config (configs/dvae/cifar10.yaml at 32 px, facescrub.yaml at 112 px,
   imagenet100.yaml at 256 px), fp32 and bf16 + channels_last: images/s of one training step (forward, Eq. 14
   loss, backward, gradient clip, Adam) and of one inference batch (sampled z, P = x − p̂, to uint8).
2. Baselines (grayscale, JPEG 10, bit depth 2, mean / median / Gaussian 3×3): images/s of the op alone at 32, 112
   and 256 px, and of the whole shard map pass (read, decode, op, PNG encode, write) on a synthetic 32 px set.
Writes <out>/dvae.json and <out>/dvae.md. --quick: tiny batches, one timed iteration (checks the script runs).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from uedist.benchmark import timed
from uedist.config import load_config
from uedist.data.manifest import Manifest
from uedist.dist import make_accelerator
from uedist.engine.dvae import DVAEConfig, build_dvae
from uedist.engine.purify import BASELINES, PurifyConfig, baseline_op
from uedist.io import atomic_write_json, atomic_write_text
from uedist.models.dvae import dvae_loss
from uedist.ops.images import to_uint8
from uedist.registry import PURIFIERS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {32: "configs/dvae/cifar10.yaml", 112: "configs/dvae/facescrub.yaml", 256: "configs/dvae/imagenet100.yaml"}
BASELINE_ARGS = {"jpeg": ["quality=10"], "bit_depth": ["bits=2"]}


def bench_dvae(px: int, batch: int, bf16: bool, acc: Any, min_time: float, max_iters: int, width: float) -> List[Dict[str, Any]]:
    cfg = load_config(DVAEConfig, REPO / CONFIGS[px], [f"bf16={str(bf16).lower()}", f"channels_last={str(bf16).lower()}"]
                      + ([f"model.width={width}"] if width else []))
    classes = cfg.data.num_classes or 10
    m = Manifest("bench", "train", [str(i) for i in range(classes)], (px, px), "png", [])
    model = build_dvae(cfg, m).to(acc.device)
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    x = torch.rand(batch, 3, px, px, device=acc.device).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=acc.device)
    amp = dict(device_type=acc.device.type, dtype=torch.bfloat16, enabled=bf16)

    def train_step() -> None:
        with torch.autocast(**amp):
            out = model(x, y)
        loss, _ = dvae_loss(type(out)(*(t.float() for t in out)), x, kld_limit=1.0, kld_weight=0.01, p_floor=0.002)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    @torch.no_grad()
    def infer() -> None:
        with torch.autocast(**amp):
            out = model.eval()(x, y)
        to_uint8(x - out.p.float())
        model.train()

    rows = []
    for what, fn in (("train step", train_step), ("inference", infer)):
        dt = timed(fn, min_time, max_iters)
        rows.append({"what": f"dvae {what}", "px": px, "batch": batch, "width": cfg.model.width,
                     "latent_blocks": cfg.model.latent_blocks, "precision": "bf16+cl" if bf16 else "fp32",
                     "images_per_s": batch / dt})
        print(f"D-VAE {what:10s} {px:3d}px {rows[-1]['precision']:7s} {batch / dt:9.2f} img/s", flush=True)
    return rows


def bench_baselines(sizes: List[int], batch: int, acc: Any, min_time: float, max_iters: int) -> List[Dict[str, Any]]:
    rows = []
    for px in sizes:
        x = torch.rand(batch, 3, px, px, device=acc.device)
        for method in BASELINES:
            op = baseline_op(load_config(PurifyConfig, None, ["data.src=x", f"method={method}", *BASELINE_ARGS.get(method, [])]))
            dt = timed(lambda: to_uint8(op(x)), min_time, max_iters)
            rows.append({"what": f"{method} op", "px": px, "batch": batch, "images_per_s": batch / dt})
            print(f"{method:10s} op   {px:3d}px {batch / dt:10.1f} img/s", flush=True)
    return rows


def bench_baseline_passes(n: int, acc: Any) -> List[Dict[str, Any]]:
    from uedist.data.build import BuildConfig, build_shard_sets

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_shard_sets(load_config(BuildConfig, None, [f"out={tmp}/d", "workers=0", "splits=[train]", "shard_size=500",
                                                         f"synthetic.num_train={n}", "synthetic.size=32"]), progress=False)
        for method in BASELINES:
            cfg = load_config(PurifyConfig, None, [f"data.src={tmp}/d/train", f"method={method}", f"run_root={tmp}",
                                                   f"name={method}", "progress=false", *BASELINE_ARGS.get(method, [])])
            s = PURIFIERS.build(method, cfg, acc, Path(tmp) / method)
            rows.append({"what": f"{method} map pass", "px": 32, "batch": cfg.data.batch_size,
                         "images_per_s": n / s["time_s"]})
            print(f"{method:10s} pass  32px {n / s['time_s']:10.1f} img/s ({n} images, PNG in and out)", flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/dvae")
    p.add_argument("--batch", type=int, nargs=3, default=[64, 16, 4], metavar=("B32", "B112", "B256"),
                   help="D-VAE batch at 32, 112, 256 px")
    p.add_argument("--width", type=float, default=0.0, help="override the configs' D-VAE width (0: keep)")
    p.add_argument("--pass-n", type=int, default=2000, help="images in the baseline map-pass timing")
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    acc = make_accelerator()
    min_time, iters = (0.0, 1) if args.quick else (args.min_time, 50)
    batches = [2, 1, 1] if args.quick else args.batch
    rows: List[Dict[str, Any]] = []
    for px, b in zip((32, 112, 256), batches):
        for bf16 in (False, True):
            rows += bench_dvae(px, b, bf16, acc, min_time, iters, args.width)
    rows += bench_baselines([32, 112, 256], 4 if args.quick else 64, acc, min_time, iters)
    rows += bench_baseline_passes(100 if args.quick else args.pass_n, acc)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    res = {"device": device, "threads": torch.get_num_threads(), "quick": args.quick, "rows": rows}
    out = Path(args.out)
    atomic_write_json(out / "dvae.json", res)
    md = [f"Purifier throughput on {device} ({torch.get_num_threads()} threads){' — QUICK, not a measurement' if args.quick else ''}.",
          "", "| what | px | batch | model | precision | images/s |", "|---|---:|---:|---|---|---:|"]
    for r in rows:
        model = f"width {r['width']}, +{r['latent_blocks']} latent blocks" if "width" in r else ""
        md.append(f"| {r['what']} | {r['px']} | {r['batch']} | {model} | {r.get('precision', 'fp32')} | "
                  f"{r['images_per_s']:.2f} |")
    atomic_write_text(out / "dvae.md", "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out / 'dvae.json'} and {out / 'dvae.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
