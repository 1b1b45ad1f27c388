"""Purify a poisoned shard set with a baseline: ISS (grayscale, JPEG, bit depth) or a 3×3 filter (mean, median,
Gaussian) — one shard map pass. D-VAE has its own script (launch/dvae.py).

    accelerate launch launch/purify.py --config configs/purify/jpeg10.yaml data.src=runs/sem_c10/poisoned
    accelerate launch launch/purify.py method=median data.src=... data.clean=shards/cifar10_jpg/train name=med_sem

Writes runs/<name>/: config.yaml, logs/, purified/ (or `out`), grid.png (poisoned | purified | clean),
metrics.json (time; PSNR against the clean set when `data.clean` is given). Resumes by shard after a kill.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from uedist.config import ConfigError, load_config, save_config
from uedist.data.manifest import ManifestError
from uedist.dist import get_logger, make_accelerator, setup_logging
from uedist.engine.purify import PurifyConfig, PurifyInputError
from uedist.registry import PURIFIERS

log = get_logger("uedist.launch.purify")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML (configs/purify/)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. method=jpeg quality=10 data.src=runs/x/poisoned")
    args = p.parse_args(argv)
    try:
        cfg = load_config(PurifyConfig, args.config, args.overrides)
    except ConfigError as e:
        p.error(str(e))
    accelerator = make_accelerator()
    run_dir = Path(cfg.run_root) / cfg.name
    setup_logging(run_dir)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    try:
        s = PURIFIERS.build(cfg.method, cfg, accelerator, run_dir)
    except (PurifyInputError, ManifestError) as e:
        log.error("%s", e)
        return 2
    if accelerator.is_main_process:
        psnr = (f"; PSNR vs clean {s['psnr_input_vs_clean']:.2f} -> {s['psnr_output_vs_clean']:.2f} dB"
                if "psnr_output_vs_clean" in s else "")
        print(f"\n{cfg.method}{' ' + str(s['params']) if s['params'] else ''}: {s['samples']} images -> {s['purified']} in {s['time_s']:.1f}s "
              f"({s['samples'] / max(s['time_s'], 1e-9):.0f} img/s){psnr}\nwrote {run_dir / 'metrics.json'}, {s['grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
