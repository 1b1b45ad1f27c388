"""Noise generation throughput and memory.

    python launch/bench_noise.py [--out runs/bench/noise] [--width 1.0] [--quick]

1. Images/s of one SEM and one REM surrogate step (fresh δ for the batch + one adversarially trained SGD step)
   and of the final pass (δ only, surrogate frozen), at 32 px (CIFAR reference settings: K_u 10, J 5, K_a 10) and
   at 256 px stored / RRC 224 (ImageNet-100 settings: K_u 7, J 4, K_a 7), fp32 vs bf16 + channels_last, with the
   forward/backward passes per image counted and the SEM/REM step-cost ratio.
2. Peak RSS of the final pass (a subprocess each) over N and 4N samples: it must not grow with the dataset.
Writes <out>/noise.json and <out>/noise.md.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from uedist.config import load_config
from uedist.data.manifest import Manifest
from uedist.dist import make_accelerator
from uedist.engine.noise import NoiseConfig, _surrogate_step, make_eot, noise_for_batch, surrogate_for
from uedist.benchmark import timed
from uedist.io import atomic_write_json, atomic_write_text

SETTINGS = {32: ["noise_steps=10", "noise_step_size=1.6", "eot_samples=5", "adv_steps=10", "adv_step_size=0.8"],
            256: ["noise_steps=7", "noise_step_size=2", "eot_samples=4", "adv_steps=7", "adv_step_size=1",
                  "augment=rrc_flip", "train_size=224"]}


def bench_steps(px: int, batch: int, width: float, bf16: bool, acc: Any, min_time: float, max_iters: int) -> List[Dict[str, Any]]:
    rows = []
    m = Manifest("bench", "train", [str(i) for i in range(10)], (px, px), "png", [])
    for method in ("sem", "rem"):
        cfg = load_config(NoiseConfig, None, [f"method={method}", f"surrogate.width={width}", "surrogate.stem=cifar",
                                              f"bf16={str(bf16).lower()}", f"channels_last={str(bf16).lower()}",
                                              *SETTINGS[px]])
        model = surrogate_for(cfg, m).to(acc.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(0)
        eot = make_eot(cfg, m, gen)
        amp = dict(device_type=acc.device.type, dtype=torch.bfloat16, enabled=bf16)
        x = torch.rand(batch, 3, px, px, device=acc.device)
        y = torch.randint(0, 10, (batch,), device=acc.device)
        inner = cfg.adv_steps + 1 if method == "rem" else 1
        noise_passes = cfg.noise_steps * cfg.eot_samples * inner
        step_passes = noise_passes + cfg.adv_steps + 1

        def step() -> None:
            d = noise_for_batch(cfg, model, x, y, eot, gen, amp)
            _surrogate_step(cfg, model, model, opt, x + d, y, eot, gen, amp, acc, 1, Path(tempfile.gettempdir()))

        def final() -> None:
            noise_for_batch(cfg, model, x, y, eot, gen, amp)

        for what, fn, passes in (("surrogate step", step, step_passes), ("final pass", final, noise_passes)):
            dt = timed(fn, min_time, max_iters)
            rows.append({"method": method, "what": what, "px": px, "batch": batch, "width": width,
                         "precision": "bf16+cl" if bf16 else "fp32", "fwd_bwd_per_image": passes,
                         "images_per_s": batch / dt, "s_per_batch": dt})
            print(f"{method} {what:14s} {px}px {'bf16' if bf16 else 'fp32'} {batch / dt:9.3f} img/s ({passes} passes/img)",
                  flush=True)
    return rows


def peak_rss(n: int, tmp: Path) -> float:
    """Peak RSS (MiB) of a subprocess that builds N synthetic samples and writes their random-noise poisoned set."""
    code = f"""
import resource, sys
from uedist.config import load_config
from uedist.data.build import BuildConfig, build_shard_sets
from uedist.dist import make_accelerator
from uedist.engine.noise import NoiseConfig, random_delta, write_poisoned
from pathlib import Path
build_shard_sets(load_config(BuildConfig, None, ["out={tmp}/d{n}", "workers=0", "splits=[train]", "shard_size=500",
    "synthetic.num_train={n}", "synthetic.size=64"]), progress=False)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = load_config(NoiseConfig, None, ["method=random", "data.train={tmp}/d{n}/train", "out={tmp}/p{n}", "progress=false",
    "data.workers=0"])
write_poisoned(cfg, make_accelerator(), Path("{tmp}"), random_delta(cfg), stage="bench")
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[-1]) / 1024


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/noise")
    p.add_argument("--width", type=float, default=1.0, help="surrogate ResNet-18 width")
    p.add_argument("--batch-32", type=int, default=8)
    p.add_argument("--batch-256", type=int, default=2)
    p.add_argument("--rss-n", type=int, default=2000, help="N for the peak-RSS comparison (N vs 4N, 64 px)")
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    acc = make_accelerator()
    rows: List[Dict[str, Any]] = []
    for px, batch in ((32, args.batch_32), (256, args.batch_256)):
        for bf16 in (False, True):
            rows += bench_steps(px, batch, args.width, bf16, acc, 0 if args.quick else args.min_time,
                                1 if args.quick else 20)
    ratios = {}
    for px in (32, 256):
        for prec in ("fp32", "bf16+cl"):
            s = [r for r in rows if r["px"] == px and r["precision"] == prec and r["what"] == "surrogate step"]
            sem = next(r for r in s if r["method"] == "sem")
            rem = next(r for r in s if r["method"] == "rem")
            ratios[f"{px}px {prec}"] = {"time_ratio_rem_over_sem": sem["images_per_s"] / rem["images_per_s"],
                                        "pass_ratio": rem["fwd_bwd_per_image"] / sem["fwd_bwd_per_image"]}
    with tempfile.TemporaryDirectory() as tmp:
        n = 200 if args.quick else args.rss_n
        rss = {"N": n, "rss_N_mib": peak_rss(n, Path(tmp)), "rss_4N_mib": peak_rss(4 * n, Path(tmp))}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    res = {"device": device, "threads": torch.get_num_threads(), "rows": rows, "ratios": ratios, "memory": rss}
    out = Path(args.out)
    atomic_write_json(out / "noise.json", res)
    md = [f"Noise generation on {device} ({torch.get_num_threads()} threads), surrogate ResNet-18 width {args.width}.", "",
          "| method | what | px | batch | precision | fwd+bwd / image | images/s |", "|---|---|---:|---:|---|---:|---:|"]
    md += [f"| {r['method']} | {r['what']} | {r['px']} | {r['batch']} | {r['precision']} | {r['fwd_bwd_per_image']} | "
           f"{r['images_per_s']:.3f} |" for r in rows]
    md += ["", "| setting | REM/SEM step time | REM/SEM passes |", "|---|---:|---:|"]
    md += [f"| {k} | {v['time_ratio_rem_over_sem']:.2f} | {v['pass_ratio']:.2f} |" for k, v in ratios.items()]
    md += ["", f"Peak RSS of the final pass (64 px random noise): N = {rss['N']}: {rss['rss_N_mib']:.0f} MiB; "
           f"4N = {4 * rss['N']}: {rss['rss_4N_mib']:.0f} MiB."]
    atomic_write_text(out / "noise.md", "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out / 'noise.json'} and {out / 'noise.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
