"""Train a victim classifier on a shard set and evaluate it on a clean test shard set.

    accelerate launch launch/victim.py --config configs/victim/cifar10_quick.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/cpu2.yaml launch/victim.py --config ... # 2 CPU processes

Writes runs/<name>/: config.yaml, logs/rank*.log, checkpoints/, curve.csv, metrics.json. Resumes by default.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from uedist.config import ConfigError, load_config, save_config
from uedist.dist import get_logger, make_accelerator, setup_logging
from uedist.engine.loop import NonFiniteLoss
from uedist.engine.victim import VictimConfig, train_victim
import uedist.models  # noqa: F401  (registers the model zoo)

log = get_logger("uedist.launch.victim")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML (configs/victim/)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. model.width=0.5 data.train=shards/x/train")
    args = p.parse_args(argv)
    try:
        cfg = load_config(VictimConfig, args.config, args.overrides)
    except ConfigError as e:
        p.error(str(e))
    accelerator = make_accelerator()
    run_dir = Path(cfg.run_root) / cfg.name
    setup_logging(run_dir)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    try:
        m = train_victim(cfg, accelerator, run_dir)
    except NonFiniteLoss as e:
        log.error("%s", e)
        return 3
    if accelerator.is_main_process:
        print(f"\n{cfg.name}: clean test top-1 {m['test_top1']:.2f}%  top-5 {m['test_top5']:.2f}%  "
              f"({m['test_samples']} test images; {m['steps']} steps = {m['epochs']:.1f} epochs; "
              f"{m['images_per_s']:.0f} img/s; {m['train_time_s']:.0f} s training on {m['world_size']} process(es))")
        print(f"wrote {run_dir / 'metrics.json'}, {run_dir / 'curve.csv'}, checkpoints in {run_dir / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
