"""Purifier throughput: D-VAE training and inference, and the baseline purifiers.

    python launch/bench/dvae.py [--out runs/bench/dvae] [--quick]

1. D-VAE, with the model of each reference config (configs/dvae/cifar10.yaml at 32 px, facescrub.yaml at 112 px,
   imagenet100.yaml at 256 px), fp32 and bf16 + channels_last: images/s of one training step (forward, Eq. 14
   loss, backward, gradient clip, Adam) and of one inference batch (sampled z, P = x − p̂, to uint8).
2. Baselines (grayscale, JPEG 10, bit depth 2, mean / median / Gaussian 3×3): images/s of the op alone at 32, 112
   and 256 px, and of the whole shard map pass (read, decode, op, PNG encode, write) on a synthetic 32 px set.
Writes <out>/dvae.json and <out>/dvae.md. --quick: tiny batches, D-VAE width 1/8, one timed iteration (checks the
script runs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from uedist.bench.fixtures import build_synthetic_set, fake_manifest, random_batch
from uedist.bench.report import markdown_table, write_report
from uedist.bench.steps import dvae_steps
from uedist.bench.timing import Setting, machine_info, timed
from uedist.config import load_config
from uedist.dist import make_accelerator
from uedist.engine.purifiers.baselines import BASELINES, PurifyConfig, baseline_op, purify_baseline
from uedist.engine.purifiers.dvae import DVAEConfig, build_dvae
from uedist.ops.images import to_uint8

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {32: "configs/dvae/cifar10.yaml", 112: "configs/dvae/facescrub.yaml", 256: "configs/dvae/imagenet100.yaml"}
BASELINE_ARGS = {"jpeg": ["quality=10"], "bit_depth": ["bits=2"]}


def bench_dvae(s: Setting, px: int, *, batch: int, width: float, min_time: float) -> list[dict[str, Any]]:
    """D-VAE train-step and inference rows at ``px`` with the model of that resolution's reference config."""
    bf16 = str(s.bf16).lower()
    cfg = load_config(
        DVAEConfig,
        REPO / CONFIGS[px],
        [f"bf16={bf16}", f"channels_last={bf16}"] + ([f"model.width={width}"] if width else []),
    )
    classes = cfg.data.num_classes or 10
    model = s.place(build_dvae(cfg, fake_manifest(px, classes)))
    x, y = random_batch(batch, px, classes, device=s.device, channels_last=s.bf16)
    rows = []
    for what, fn in dvae_steps(model, x, y, amp=s.amp, grad_clip=cfg.grad_clip).items():
        dt = timed(fn, min_time)
        rows.append(
            {
                "what": f"dvae {what}",
                "px": px,
                "batch": batch,
                "width": cfg.model.width,
                "latent_blocks": cfg.model.latent_blocks,
                "precision": s.precision,
                "images_per_s": batch / dt,
            }
        )
        print(f"D-VAE {what:10s} {px:3d}px {s.precision:7s} {batch / dt:9.2f} img/s", flush=True)
    return rows


def baseline_config(method: str, *over: str) -> PurifyConfig:
    return load_config(PurifyConfig, None, [f"method={method}", *BASELINE_ARGS.get(method, []), *over])


def apply_u8(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``op(x)`` as uint8: what a baseline pass stores."""
    return to_uint8(op(x))


def bench_baselines(s: Setting, sizes: list[int], *, batch: int, min_time: float) -> list[dict[str, Any]]:
    """Rows of each baseline op alone on a float batch, to uint8."""
    rows = []
    for px in sizes:
        x = torch.rand(batch, 3, px, px, device=s.device)
        for method in BASELINES:
            op = baseline_op(baseline_config(method, "data.src=x"))
            dt = timed(partial(apply_u8, op, x), min_time)
            rows.append({"what": f"{method} op", "px": px, "batch": batch, "images_per_s": batch / dt})
            print(f"{method:10s} op   {px:3d}px {batch / dt:10.1f} img/s", flush=True)
    return rows


def bench_baseline_passes(n: int, acc: Any) -> list[dict[str, Any]]:
    """Rows of each baseline's whole map pass (``purify_baseline``) over a synthetic 32 px PNG set of ``n``."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train = build_synthetic_set(Path(tmp) / "d", num_train=n, size=32, shard_size=500)
        for method in BASELINES:
            cfg = baseline_config(method, f"data.src={train}", f"run_root={tmp}", f"name={method}", "progress=false")
            sec = purify_baseline(cfg, acc, Path(tmp) / method)["time_s"]
            rows.append({"what": f"{method} map pass", "px": 32, "batch": cfg.data.batch_size, "images_per_s": n / sec})
            print(f"{method:10s} pass  32px {n / sec:10.1f} img/s ({n} images, PNG in and out)", flush=True)
    return rows


def to_markdown(res: dict[str, Any]) -> str:
    md = [
        (
            f"Purifier throughput on {res['device']} ({res['threads']} threads)"
            f"{' — QUICK, not a measurement' if res['quick'] else ''}."
        ),
        "",
    ]
    md += markdown_table(
        ["what", "px", "batch", "model", "precision", "images/s"],
        [
            (
                r["what"],
                r["px"],
                r["batch"],
                f"width {r['width']}, +{r['latent_blocks']} latent blocks" if "width" in r else "",
                r.get("precision", "fp32"),
                f"{r['images_per_s']:.2f}",
            )
            for r in res["rows"]
        ],
        "lrrllr",
    )
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/dvae")
    p.add_argument(
        "--batch",
        type=int,
        nargs=3,
        default=[64, 16, 4],
        metavar=("B32", "B112", "B256"),
        help="D-VAE batch at 32, 112, 256 px",
    )
    p.add_argument("--width", type=float, default=0.0, help="override the configs' D-VAE width (0: keep)")
    p.add_argument("--pass-n", type=int, default=2000, help="images in the baseline map-pass timing")
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    acc = make_accelerator()
    min_time = Setting(acc.device, quick=args.quick).min_time(args.min_time)
    width = args.width or (0.125 if args.quick else 0.0)
    rows: list[dict[str, Any]] = []
    for px, b in zip((32, 112, 256), [2, 1, 1] if args.quick else args.batch):
        for bf16 in (False, True):
            s = Setting(acc.device, bf16=bf16, quick=args.quick)
            rows += bench_dvae(s, px, batch=b, width=width, min_time=min_time)
    rows += bench_baselines(Setting(acc.device), [32, 112, 256], batch=4 if args.quick else 64, min_time=min_time)
    rows += bench_baseline_passes(100 if args.quick else args.pass_n, acc)
    res = {**machine_info(acc.device), "quick": args.quick, "rows": rows}
    md = to_markdown(res)
    paths = write_report(Path(args.out), "dvae", res, markdown=md)
    print(md + "wrote " + " and ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
