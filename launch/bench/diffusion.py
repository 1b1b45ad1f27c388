"""Diffusion throughput: UNet forward / forward+backward, DDPM training steps, and purification per setting.

    python launch/bench/diffusion.py [--out runs/bench/diffusion] [--quick] [--bf16-only]

Rows (images/s; untrained weights: speed does not depend on them):
  unet_fwd        one UNet forward (no grad), reference CIFAR-10 model at 32 px and the 256 px model
  unet_fwd_bwd    forward + backward of the ε loss
  ddpm_train      a full training step: loss, backward, gradient clip, Adam, EMA update
  purify          one purification of a batch: N rounds × (T_p / stride) denoising steps, each JCDP step with
                  its guidance gradient (MSE: analytic; LPIPS-AlexNet with a random trunk: one backward)
Writes <out>/diffusion.json and <out>/diffusion.md. ``--quick`` uses a tiny UNet and one iteration (a smoke run).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

from uedist.bench.report import markdown_table, write_report
from uedist.bench.steps import eps_model, unet_steps
from uedist.bench.timing import Setting, machine_info, timed
from uedist.diffusion.purify import jcdp_guidance, purify
from uedist.diffusion.schedule import Schedule
from uedist.dist import make_accelerator
from uedist.models.lpips import build_lpips
from uedist.models.unet import UNETS

PURIFY = [  # (label, method, T_p, N, stride, λ₁, λ₂)
    ("plain T_p=20", "plain", 20, 1, 1, 0.0, 0.0),
    ("JCDP T_p=20 N=4 (reference)", "jcdp", 20, 4, 1, 30.0, 300.0),
    ("JCDP T_p=20 N=4 stride 10 (CPU config)", "jcdp", 20, 4, 10, 30.0, 3e4),
]
QUICK_UNET = {"ch": 16, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (16,), "image_size": 32}


def bench_unet(
    s: Setting, name: str, kw: dict[str, Any], *, px: int, batch: int, min_time: float
) -> list[dict[str, Any]]:
    """unet_fwd, unet_fwd_bwd and ddpm_train rows of UNet ``name`` (built with ``kw``) at ``px``."""
    net = UNETS.build(name, **kw).to(s.device)
    x = torch.rand(batch, 3, px, px, device=s.device) * 2 - 1
    base = {
        "model": name,
        "px": px,
        "batch": batch,
        "precision": "bf16" if s.bf16 else "fp32",
        "params": sum(p.numel() for p in net.parameters()),
    }
    return [
        {**base, "what": what, "images_per_s": batch / timed(fn, min_time)}
        for what, fn in unet_steps(net, x, amp=s.amp).items()
    ]


def bench_purify(
    s: Setting, name: str, kw: dict[str, Any], *, px: int, batch: int, min_time: float
) -> list[dict[str, Any]]:
    """One row per ``PURIFY`` setting: a batch purified by UNet ``name`` at ``px``."""
    eps = eps_model(UNETS.build(name, **kw).to(s.device).eval(), s.amp)
    lp = build_lpips("alex", backbone="random").to(s.device)
    x = torch.rand(batch, 3, px, px, device=s.device) * 2 - 1
    rows = []
    for label, method, t_p, rounds, stride, l1, l2 in PURIFY:
        sched = Schedule.linear(1000)
        sched = sched if stride == 1 else sched.respaced(range(stride - 1, 1000, stride))
        guide = (
            jcdp_guidance(lp, lam_mse=l1, lam_lpips=l2, mse_t=(11, 1000), lpips_t=(1, 10)) if method == "jcdp" else None
        )
        gen = torch.Generator(device=s.device).manual_seed(0)
        run = partial(purify, eps, sched, x, t_p=t_p, rounds=rounds, gen=gen, guide=guide)
        sec = timed(run, min_time)
        rows.append(
            {
                "model": name,
                "px": px,
                "batch": batch,
                "precision": "bf16" if s.bf16 else "fp32",
                "what": "purify",
                "setting": label,
                "denoising_steps": rounds * t_p // stride,
                "images_per_s": batch / sec,
            }
        )
    return rows


def to_markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [f"Diffusion throughput, images/s on {machine['device']} ({machine['threads']} threads).", ""]
    lines += markdown_table(
        ["what", "model", "px", "batch", "precision", "setting", "images/s"],
        [
            (
                r["what"],
                r["model"],
                r["px"],
                r["batch"],
                r["precision"],
                f"{r['setting']} ({r['denoising_steps']} steps)"
                if "setting" in r
                else f"{r['params'] / 1e6:.1f} M params",
                f"{r['images_per_s']:.2f}",
            )
            for r in rows
        ],
        "llrrllr",
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/diffusion")
    p.add_argument("--batch-32", type=int, default=32)
    p.add_argument("--batch-256", type=int, default=2)
    p.add_argument("--min-time", type=float, default=3.0)
    p.add_argument("--bf16-only", action="store_true", help="skip the fp32 rows")
    p.add_argument("--quick", action="store_true", help="tiny UNet, one iteration each (smoke run)")
    args = p.parse_args(argv)
    device = make_accelerator().device
    models = (
        [("unet", QUICK_UNET, 32, 4)]
        if args.quick
        else [("ddpm_cifar10", {}, 32, args.batch_32), ("ddpm_256", {}, 256, args.batch_256)]
    )
    lim = {"min_time": Setting(device, quick=args.quick).min_time(args.min_time)}
    rows: list[dict[str, Any]] = []
    for name, kw, px, batch in models:
        for bf16 in (True,) if args.bf16_only else (False, True):
            for r in bench_unet(Setting(device, bf16=bf16), name, kw, px=px, batch=batch, **lim):
                rows.append(r)
                print(
                    f"{r['what']:13s} {name:12s} {px:4d}px {r['precision']} {r['images_per_s']:9.2f} img/s", flush=True
                )
    name, kw, px, batch = models[0]  # purification: the 32 px model (the LE paper's CIFAR setting)
    for r in bench_purify(Setting(device, bf16=True), name, kw, px=px, batch=batch, **lim):
        rows.append(r)
        print(f"purify {r['setting']:42s} {r['images_per_s']:9.2f} img/s", flush=True)
    machine = {**machine_info(device), "quick": args.quick}
    md = to_markdown(rows, machine)
    paths = write_report(Path(args.out), "diffusion", {"machine": machine, "results": rows}, markdown=md)
    print(md + "wrote " + " and ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
