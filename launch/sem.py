"""The main job. Until SEM noise generation lands (issue 4), it builds the built-in synthetic shard sets (if
absent), verifies them, and inspects them: a summary and a PNG grid of samples per class.

    accelerate launch launch/sem.py                                   # synthetic default, minutes on a laptop CPU
    accelerate launch launch/sem.py --config configs/shards/synthetic.yaml synthetic.num_classes=20
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from uedist.config import ConfigError, load_config, save_config
from uedist.data.build import BuildConfig, build_shard_sets, default_out
from uedist.data.inspect import sample_grid, summarize
from uedist.data.manifest import load_manifest
from uedist.data.shards import verify_shard_set
from uedist.dist import get_logger, make_accelerator, setup_logging

log = get_logger("uedist.launch.sem")
DEFAULTS = ["source=synthetic", "out=shards/synthetic", "shard_size=500"]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="shard build YAML (default: the synthetic dataset)")
    p.add_argument("overrides", nargs="*", help="key=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(BuildConfig, args.config, ([] if args.config else DEFAULTS) + args.overrides)
    except ConfigError as e:
        p.error(str(e))
    accelerator = make_accelerator()
    out = default_out(cfg)
    setup_logging(out)
    t0 = time.time()
    if accelerator.is_main_process:  # ingest is a single-writer job; the other ranks wait for it
        build_shard_sets(cfg)
        save_config(cfg, out / "build_config.yaml")
    accelerator.wait_for_everyone()
    t_build = time.time() - t0
    if accelerator.is_main_process:
        for split in cfg.splits:
            folder = out / split
            rep = verify_shard_set(folder)
            if not rep.ok:
                log.error("verification failed for %s: %s", folder, rep.problems)
                return 1
            print(summarize(load_manifest(folder), folder))
            print(f"verify      OK ({rep.num_samples} samples)")
            print(f"sample grid {sample_grid(folder)}\n")
        print(f"shard sets under {out}/ ({', '.join(cfg.splits)}); build {t_build:.1f}s, total {time.time() - t0:.1f}s")
        print("SEM noise generation arrives with issue 4; this job currently builds and inspects the data.")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
