"""Throughput of the six attacks of the seed tables, and NTGA's kernel cost against its block size.

    python launch/bench/attacks.py [--out runs/bench/attacks] [--width 1.0] [--quick]

1. Images/s of one ``make_delta`` call per attack, i.e. the noise of one map-pass batch (for TAP and SEP the
   crafting pass against a ResNet-18 of ``--width``), at 32 px and at 224 px (AR at 32 px only: its process
   diverges at 224), on random images, at the reference settings of ``configs/<method>/cifar10.yaml``. TAP (250
   steps x 8 restarts) and SEP (30 x (15 + 15) passes) cost the same per PGD step whatever the step count, so they
   are timed over ``--steps`` steps (one restart) and scaled to the reference's count (columns ``timed passes`` /
   ``reference passes``); the others are timed as they run.
2. NTGA: seconds per PGD step (kernel + prediction + gradient) for blocks of 64 … 512 at 32 px against a target set
   of ``--target`` images, fp64 and fp32.
Writes <out>/attacks.json and <out>/attacks.md. ``--quick``: tiny sizes (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from uedist.benchmark import machine_info, markdown_table, write_report
from uedist.engine.attacks.ar import ARConfig, ar_delta
from uedist.engine.attacks.lsp import LSPConfig, lsp_delta
from uedist.engine.attacks.ntga import NTGAConfig, ntga_block
from uedist.engine.attacks.ops import ops_delta
from uedist.engine.attacks.sep import SEPConfig, sep_delta
from uedist.engine.attacks.tap import TAPConfig, tap_delta
from uedist.models.wrappers import Normalized
from uedist.ops.images import IMAGENET_MEAN, IMAGENET_STD
from uedist.registry import MODELS


def _time(fn: Callable[[], Any], *, min_time: float, max_iters: int) -> float:
    fn()  # warm-up
    t0, n = time.perf_counter(), 0
    while n < max_iters and (n == 0 or time.perf_counter() - t0 < min_time):
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def _net(width: float, px: int) -> torch.nn.Module:
    import uedist.models  # noqa: F401

    stem = "cifar" if px <= 64 else "imagenet"
    net = MODELS.build("resnet18", num_classes=10, stem=stem, width=width)
    return Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval().requires_grad_(False)


def makers(px: int, *, width: float, steps: int) -> Dict[str, tuple]:
    """attack -> (make_delta, timed passes per image, reference passes per image)."""
    size = (px, px)
    tap = TAPConfig(steps=steps, restarts=1, augment="crop_flip" if px <= 64 else "rrc_flip")
    sep = SEPConfig(steps=1, vr_steps=max(steps - 2, 0), num_models=2)
    nets = [_net(width, px) for _ in range(2)]
    cents = [torch.randn(10, _feat_dim(n, px)) for n in nets]
    picks = [[{"row": k, "col": k, "colour": [1, 0, 1]}] for k in range(10)]
    out = {
        "lsp": (lsp_delta(LSPConfig(patch_size=8 if px <= 64 else 32), num_classes=10, size=size), 0, 0),
        "ar": (ar_delta(ARConfig(), num_classes=10, size=size), 0, 0),
        "ops": (ops_delta(picks), 0, 0),
        "tap": (tap_delta(tap, nets[0], num_classes=10, size=px, device=torch.device("cpu")), steps + 1, 250 * 8 + 8),
        "sep": (sep_delta(sep, models=nets, cents=cents, num_classes=10), 2 + sep.vr_steps, 30 * (15 + 15)),
    }
    if px > ARConfig().max_size:  # the AR process diverges at ImageNet sizes (uedist/engine/ar.py)
        del out["ar"]
    return out


def _feat_dim(net: torch.nn.Module, px: int) -> int:
    from uedist.engine.attacks.base import features_and_logits

    with torch.no_grad():
        return features_and_logits(net, torch.rand(1, 3, px, px))[0].shape[1]


def bench_attacks(px: int, *, batch: int, width: float, steps: int, min_time: float) -> List[Dict[str, Any]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, px, px, generator=g), torch.randint(0, 10, (batch,), generator=g)
    keys = [f"{i:08d}" for i in range(batch)]
    for name, (make, timed, ref) in makers(px, width=width, steps=steps).items():
        dt = _time(lambda make=make: make(x, y, keys), min_time=min_time, max_iters=3)
        rate = batch / dt
        scaled = rate * timed / ref if ref else rate
        rows.append(
            {"attack": name, "px": px, "batch": batch, "timed_passes": timed, "reference_passes": ref,
             "timed_images_per_s": rate, "images_per_s_at_reference": scaled}
        )  # fmt: skip
        print(f"{name:5s} {px:4d}px  {rate:10.2f} img/s timed, {scaled:10.3f} img/s at the reference", flush=True)
    ntga = NTGAConfig(target_size=64, stride=2 if px <= 64 else 3)  # the reference rule: one gradient per block
    xt, yt = torch.rand(64, 3, px, px, generator=g), torch.randint(0, 10, (64,), generator=g)
    k = ntga.make_kernel()
    nb = min(batch, 64)
    dt = _time(
        lambda: ntga_block(k, x[:nb], y[:nb], target=(xt, yt), cfg=ntga, num_classes=10),
        min_time=min_time, max_iters=3,
    )  # fmt: skip
    rows.append(
        {"attack": "ntga", "px": px, "batch": nb, "timed_passes": 1, "reference_passes": 1,
         "timed_images_per_s": nb / dt, "images_per_s_at_reference": nb / dt, "target": 64}
    )  # fmt: skip
    print(f"ntga  {px:4d}px  {nb / dt:10.2f} img/s (CNN kernel, block {nb}, target 64)", flush=True)
    return rows


def bench_ntga_blocks(blocks: List[int], *, target: int, min_time: float) -> List[Dict[str, Any]]:
    """Seconds per NTGA gradient (the reference rule's one step) against the block size: 32 px, the CNN kernel,
    fp64 and fp32."""
    rows = []
    g = torch.Generator().manual_seed(1)
    xt, yt = torch.rand(target, 3, 32, 32, generator=g), torch.randint(0, 10, (target,), generator=g)
    for f64 in (True, False):
        cfg = NTGAConfig(target_size=target, float64=f64)
        for b in blocks:
            x, y = torch.rand(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)
            dt = _time(
                lambda x=x, y=y, cfg=cfg: ntga_block(cfg.make_kernel(), x, y, target=(xt, yt), cfg=cfg, num_classes=10),
                min_time=min_time, max_iters=3,
            )  # fmt: skip
            rows.append({"block": b, "target": target, "float64": f64, "s_per_block": dt, "images_per_s": b / dt})
            print(f"ntga block {b:4d} target {target} {'fp64' if f64 else 'fp32'}: {dt:.3f} s/block", flush=True)
    return rows


def to_markdown(res: Dict[str, Any]) -> str:
    md = [f"Attacks on {res['device']} ({res['threads']} threads); TAP/SEP against ResNet-18 width {res['width']}.", ""]
    md += markdown_table(
        ["attack", "px", "batch", "timed passes / image", "reference passes / image", "images/s timed",
         "images/s at the reference settings"],
        [(r["attack"], r["px"], r["batch"], r["timed_passes"] or "-", r["reference_passes"] or "-",
          f"{r['timed_images_per_s']:.2f}", f"{r['images_per_s_at_reference']:.3f}") for r in res["rows"]],
        "lrrrrrr",
    )  # fmt: skip
    md += [
        "",
        "The ntga rows above time one block against a target set of 64 images (the reference: 10,000; see below).",
        "",
        f"NTGA (CNN kernel, the reference rule: one gradient per block) against the block size, 32 px, "
        f"target {res['target']}:",
        "",
    ]
    md += markdown_table(
        ["block", "precision", "s / block", "images/s"],
        [(r["block"], "fp64" if r["float64"] else "fp32", f"{r['s_per_block']:.3f}", f"{r['images_per_s']:.1f}")
         for r in res["ntga_blocks"]],
        "rlrr",
    )  # fmt: skip
    return "\n".join(md) + "\n"


def main(argv: Any = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/attacks")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=3, help="PGD steps timed for TAP / SEP (scaled to the reference)")
    p.add_argument("--target", type=int, default=2000, help="NTGA target set size for the block sweep")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    quick = a.quick
    res: Dict[str, Any] = {**machine_info(torch.device("cpu")), "width": 0.125 if quick else a.width}
    rows = []
    for px, batch in ((32, 8 if quick else 64), (224, 2 if quick else 8)):
        rows += bench_attacks(
            px, batch=batch, width=res["width"], steps=1 if quick else a.steps, min_time=0 if quick else 2
        )
    res["rows"] = rows
    res["target"] = 64 if quick else a.target
    res["ntga_blocks"] = bench_ntga_blocks(
        [16, 32] if quick else [64, 128, 256, 512], target=res["target"], min_time=0 if quick else 2
    )
    js, md = write_report(Path(a.out), "attacks", res, markdown=to_markdown(res))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
