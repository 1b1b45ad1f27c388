"""How much bf16 + channels_last changes SEM / REM noise: δ of a trained surrogate at fp32 vs at the defaults.

    python launch/bench/precision_delta.py --run runs/sem_c10_fast [--n 512] [--out runs/bench/precision_delta]

Loads the run's config and surrogate, computes δ for its first N training images twice with the same draws
(one generator seed per batch, as the final pass does) — fp32 (``bf16=false channels_last=false``) and the run's
own precision — quantizes both to /255 as the written set would be, and reports the fraction of values that
differ, the mean and max |difference| in /255 levels, and the fraction of positions whose sign differs.
Writes <out>/precision_delta.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from uedist.bench.report import markdown_table, write_report
from uedist.bench.timing import machine_info
from uedist.config import load_config
from uedist.data.loaders import make_map_loader
from uedist.data.manifest import load_manifest
from uedist.dist import make_accelerator
from uedist.engine.attacks.base import batch_gen
from uedist.engine.attacks.sem_rem import SEMConfig, noise_for_batch
from uedist.engine.attacks.surrogate import load_surrogate, make_eot
from uedist.ops.images import to_unit
from uedist.precision import amp_args, resolved, use_channels_last


def deltas(cfg: SEMConfig, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, keys: list, m: Any) -> Any:
    device = x.device
    if use_channels_last(cfg.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        model = model.to(memory_format=torch.contiguous_format)
    gen = batch_gen(cfg.seed, keys, device=device)
    d = noise_for_batch(cfg, model, x, y=y, eot=make_eot(cfg, m, gen), gen=gen, amp=amp_args(cfg.bf16, device))
    return torch.round(d * 255).clamp(-cfg.budget, cfg.budget)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished SEM / REM run folder (config.yaml + surrogate/)")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default="runs/bench/precision_delta")
    args = p.parse_args(argv)
    run = Path(args.run)
    cfg = load_config(SEMConfig, run / "config.yaml")
    acc = make_accelerator()
    m = load_manifest(cfg.data.train)
    model = load_surrogate(cfg, run, m=m, device=acc.device)
    fp32 = dataclasses.replace(cfg, bf16=False, channels_last=False)
    same = diff_sum = sign_flip = total = 0.0
    worst = 0.0
    loader = make_map_loader(Path(cfg.data.train), batch_size=args.batch, num_workers=0)
    for batch in loader:
        if not batch["key"]:
            continue
        x = to_unit(batch["image"].to(acc.device))
        y, keys = batch["label"].to(acc.device), [str(k) for k in batch["key"]]
        a, b = deltas(fp32, model, x, y, keys, m), deltas(cfg, model, x, y, keys, m)
        total += a.numel()
        same += float((a == b).sum())
        diff_sum += float((a - b).abs().sum())
        sign_flip += float(((a * b) < 0).sum())
        worst = max(worst, float((a - b).abs().max()))
        if total >= args.n * a[0].numel():
            break
    prec = resolved(cfg, acc.device)
    res = {
        **machine_info(acc.device),
        "run": str(run),
        "method": cfg.method,
        "images": int(total // a[0].numel()),
        "other_precision": prec,
        "fraction_different": 1 - same / total,
        "mean_abs_diff_levels": diff_sum / total,
        "max_abs_diff_levels": worst,
        "fraction_sign_flipped": sign_flip / total,
    }
    md = [
        f"δ at fp32 vs {'bf16' if prec['bf16'] else 'fp32'}"
        f"{' + channels_last' if prec['channels_last'] else ''}, {cfg.method.upper()} surrogate of {run}:",
        "",
    ]
    md += markdown_table(
        ["images", "values differing", "mean |Δ| (/255)", "max |Δ| (/255)", "sign flipped"],
        [(res["images"], f"{100 * res['fraction_different']:.2f} %", f"{res['mean_abs_diff_levels']:.3f}",
          f"{res['max_abs_diff_levels']:.0f}", f"{100 * res['fraction_sign_flipped']:.2f} %")],
        "rrrrr",
    )  # fmt: skip
    paths = write_report(Path(args.out), "precision_delta", res, markdown="\n".join(md) + "\n")
    print("\n".join(md) + "\nwrote " + " and ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
