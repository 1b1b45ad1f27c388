"""Purify a poisoned shard set with a baseline: ISS (grayscale, JPEG, bit depth) or a 3×3 filter (mean, median,
Gaussian) — one shard map pass. D-VAE has its own script (launch/dvae.py).

    accelerate launch launch/purify.py --config configs/purify/jpeg10.yaml data.src=runs/sem_c10/poisoned
    accelerate launch launch/purify.py method=median data.src=... data.clean=shards/cifar10_jpg/train name=med_sem

Writes runs/<name>/: config.yaml, logs/, purified/ (or `out`), grid.png (poisoned | purified | clean),
metrics.json (time; PSNR against the clean set when `data.clean` is given). Resumes by shard after a kill.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from uedist.data.manifest import ManifestError
from uedist.dist import get_logger
from uedist.jobs import guarded, start_job
from uedist.engine.purify import PurifyConfig, PurifyInputError
from uedist.registry import PURIFIERS

log = get_logger("uedist.launch.purify")


def main(argv: Optional[List[str]] = None) -> int:
    cfg, accelerator, run_dir = start_job(PurifyConfig, __doc__, "configs/purify/",
                                          "method=jpeg quality=10 data.src=runs/x/poisoned", argv)
    s = guarded(lambda: PURIFIERS.build(cfg.method, cfg, accelerator, run_dir), log, (PurifyInputError, ManifestError))
    if isinstance(s, int):
        return s
    if accelerator.is_main_process:
        psnr = (f"; PSNR vs clean {s['psnr_input_vs_clean']:.2f} -> {s['psnr_output_vs_clean']:.2f} dB"
                if "psnr_output_vs_clean" in s else "")
        print(f"\n{cfg.method}{' ' + str(s['params']) if s['params'] else ''}: {s['samples']} images -> {s['purified']} in {s['time_s']:.1f}s "
              f"({s['samples'] / max(s['time_s'], 1e-9):.0f} img/s){psnr}\nwrote {run_dir / 'metrics.json'}, {s['grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
