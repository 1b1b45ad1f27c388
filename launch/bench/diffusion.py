"""Diffusion throughput: UNet forward / forward+backward, DDPM training steps, and purification per setting.

    python launch/bench_diffusion.py [--out runs/bench/diffusion] [--quick] [--bf16-only]

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
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from uedist.benchmark import timed
from uedist.diffusion.ema import EMA
from uedist.diffusion.purify import jcdp_guidance, purify
from uedist.diffusion.schedule import Schedule
from uedist.io import atomic_write_json, atomic_write_text
from uedist.models.lpips import build_lpips
from uedist.models.unet import UNETS

PURIFY = [  # (label, method, T_p, N, stride, λ₁, λ₂)
    ("plain T_p=20", "plain", 20, 1, 1, 0.0, 0.0),
    ("JCDP T_p=20 N=4 (reference)", "jcdp", 20, 4, 1, 30.0, 300.0),
    ("JCDP T_p=20 N=4 stride 10 (CPU config)", "jcdp", 20, 4, 10, 30.0, 3e4),
]


def bench_unet(name: str, kw: Dict[str, Any], px: int, batch: int, bf16: bool, device: torch.device,
               min_time: float, max_iters: int) -> List[Dict[str, Any]]:
    net = UNETS.build(name, **kw).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    ema = EMA(net)
    s = Schedule.linear(1000)
    x = torch.rand(batch, 3, px, px, device=device) * 2 - 1
    t = torch.randint(0, 1000, (batch,), device=device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    def fwd() -> None:
        with torch.no_grad(), torch.autocast(**amp):
            net(x, t)

    def loss() -> torch.Tensor:
        noise = torch.randn_like(x)
        with torch.autocast(**amp):
            return F.mse_loss(net(s.q_sample(x, t, noise), t).float(), noise)

    def fwd_bwd() -> None:
        net.zero_grad(set_to_none=True)
        loss().backward()

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net)

    base = {"model": name, "px": px, "batch": batch, "precision": "bf16" if bf16 else "fp32",
            "params": sum(p.numel() for p in net.parameters())}
    net.eval()
    rows = [{**base, "what": "unet_fwd", "images_per_s": batch / timed(fwd, min_time, max_iters)}]
    net.train()
    rows.append({**base, "what": "unet_fwd_bwd", "images_per_s": batch / timed(fwd_bwd, min_time, max_iters)})
    rows.append({**base, "what": "ddpm_train", "images_per_s": batch / timed(train, min_time, max_iters)})
    return rows


def bench_purify(name: str, kw: Dict[str, Any], px: int, batch: int, bf16: bool, device: torch.device,
                 min_time: float, max_iters: int) -> List[Dict[str, Any]]:
    net = UNETS.build(name, **kw).to(device).eval()
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    lp = build_lpips("alex", backbone="random").to(device)
    x = torch.rand(batch, 3, px, px, device=device) * 2 - 1
    rows = []

    def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(**amp):
            return net(z, t).float()

    for label, method, t_p, rounds, stride, l1, l2 in PURIFY:
        s = Schedule.linear(1000)
        s = s if stride == 1 else s.respaced(range(stride - 1, 1000, stride))
        guide = jcdp_guidance(lp, lam_mse=l1, lam_lpips=l2, mse_t=(11, 1000), lpips_t=(1, 10)) if method == "jcdp" else None
        gen = torch.Generator(device=device).manual_seed(0)
        sec = timed(lambda: purify(eps_fn, s, x, t_p=t_p, rounds=rounds, gen=gen, guide=guide), min_time, max_iters)
        rows.append({"model": name, "px": px, "batch": batch, "precision": "bf16" if bf16 else "fp32", "what": "purify",
                     "setting": label, "denoising_steps": rounds * t_p // stride, "images_per_s": batch / sec})
    return rows


def to_markdown(rows: List[Dict[str, Any]], machine: Dict[str, Any]) -> str:
    lines = [f"Diffusion throughput, images/s on {machine['device']} ({machine['threads']} threads).", "",
             "| what | model | px | batch | precision | setting | images/s |", "|---|---|---:|---:|---|---|---:|"]
    for r in rows:
        setting = f"{r['setting']} ({r['denoising_steps']} steps)" if "setting" in r else f"{r['params'] / 1e6:.1f} M params"
        lines.append(f"| {r['what']} | {r['model']} | {r['px']} | {r['batch']} | {r['precision']} | {setting} | "
                     f"{r['images_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/diffusion")
    p.add_argument("--batch-32", type=int, default=32)
    p.add_argument("--batch-256", type=int, default=2)
    p.add_argument("--min-time", type=float, default=3.0)
    p.add_argument("--bf16-only", action="store_true", help="skip the fp32 rows")
    p.add_argument("--quick", action="store_true", help="tiny UNet, one iteration each (smoke run)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        models = [("unet", {"ch": 16, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (16,), "image_size": 32}, 32, 4)]
        min_time, max_iters = 0.0, 1
    else:
        models = [("ddpm_cifar10", {}, 32, args.batch_32), ("ddpm_256", {}, 256, args.batch_256)]
        min_time, max_iters = args.min_time, 20
    rows: List[Dict[str, Any]] = []
    for name, kw, px, batch in models:
        for bf16 in ((True,) if args.bf16_only else (False, True)):
            for r in bench_unet(name, kw, px, batch, bf16, device, min_time, max_iters):
                rows.append(r)
                print(f"{r['what']:13s} {name:12s} {px:4d}px {r['precision']} {r['images_per_s']:9.2f} img/s", flush=True)
    name, kw, px, batch = models[0]  # purification: the 32 px model (the LE paper's CIFAR setting)
    for r in bench_purify(name, kw, px, batch, True, device, min_time, max_iters):
        rows.append(r)
        print(f"purify {r['setting']:42s} {r['images_per_s']:9.2f} img/s", flush=True)
    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
               "quick": args.quick}
    out = Path(args.out)
    atomic_write_json(out / "diffusion.json", {"machine": machine, "results": rows})
    atomic_write_text(out / "diffusion.md", to_markdown(rows, machine))
    print(to_markdown(rows, machine))
    print(f"wrote {out / 'diffusion.json'} and {out / 'diffusion.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
