"""Purify a poisoned shard set with D-VAE (two stages, Algorithm 1 of Yu et al., ICML 2024).

    accelerate launch launch/dvae.py --config configs/dvae/cifar10.yaml data.train=runs/sem_c10/poisoned
    accelerate launch launch/dvae.py --config configs/dvae/cifar10_cpu.yaml data.train=... data.clean=... name=...
    accelerate launch --config_file configs/accelerate/cpu2.yaml launch/dvae.py --config ...   # 2 CPU processes

Writes runs/<name>/: config.yaml, logs/, stage1/ and stage2/ checkpoints, the shard sets p1/, p2/ and purified/
(or `out`), stage{1,2}_curve.csv, grid.png (poisoned | p̂ | P¹ | P² | purified | clean), metrics.json (KLD,
reconstruction error, PSNR against the clean set when `data.clean` is given). Resumes by default: rerun the same
command after a kill. Exit code 2: bad config or input; 3: non-finite loss.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

from uedist.data.manifest import ManifestError
from uedist.dist import get_logger
from uedist.jobs import guarded, start_job
from uedist.engine.dvae import DVAEConfig
from uedist.engine.purify import PurifyInputError
from uedist.registry import PURIFIERS

log = get_logger("uedist.launch.dvae")


def main(argv: Optional[List[str]] = None) -> int:
    cfg, accelerator, run_dir = start_job(DVAEConfig, __doc__, "configs/dvae/",
                                          "data.train=runs/x/poisoned epochs=10", argv)
    t0 = time.time()
    s = guarded(lambda: PURIFIERS.build("dvae", cfg, accelerator, run_dir), log, (PurifyInputError, ManifestError))
    if isinstance(s, int):
        return s
    if accelerator.is_main_process:
        print(summary_text(s, time.time() - t0, run_dir))
    return 0


def summary_text(s: dict, wall: float, run_dir: Path) -> str:
    lines = ["", f"D-VAE purification: {s['name']}  (kld limits {s['kld_limits'][0]} / {s['kld_limits'][1]})"]
    for key, label in (("p1", "P1 = x0 - p0"), ("p2", "P2 = x1 - p1"), ("purified_stats", "P3 = rec(P2)")):
        r = s[key]
        row = f"  {label:14s} KLD {r.get('kld', float('nan')):.3f}/pos, rec PSNR {r.get('rec_psnr', float('nan')):.2f} dB"
        if "psnr_output_vs_clean" in r:
            row += f", vs clean {r['psnr_input_vs_clean']:.2f} -> {r['psnr_output_vs_clean']:.2f} dB"
        lines.append(row + (" (reused)" if r.get("reused") else ""))
    lines.append(f"  purified set   {s['purified']}")
    lines.append("  time           " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in s["timings"].items())
                 + f", total {wall:.0f}s")
    lines.append(f"  wrote          {run_dir / 'metrics.json'}, {s['grid']}")
    lines.append(f"  next           accelerate launch launch/victim.py --config <victim config> "
                 f"data.train={s['purified']} name={s['name']}_victim")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
