"""Train a victim classifier on a shard set and evaluate it on a clean test shard set.

    accelerate launch launch/victim.py --config configs/victim/cifar10_quick.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/cpu2.yaml launch/victim.py --config ... # 2 CPU processes

Writes runs/<name>/: config.yaml, logs/rank*.log, checkpoints/, curve.csv, metrics.json. Resumes by default.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from uedist.dist import get_logger
from uedist.jobs import guarded, start_job
from uedist.engine.victim import VictimConfig, train_victim
import uedist.models  # noqa: F401  (registers the model zoo)

log = get_logger("uedist.launch.victim")


def main(argv: Optional[List[str]] = None) -> int:
    cfg, accelerator, run_dir = start_job(VictimConfig, __doc__, "configs/victim/",
                                          "model.width=0.5 data.train=shards/x/train", argv)
    m = guarded(lambda: train_victim(cfg, accelerator, run_dir), log)
    if isinstance(m, int):
        return m
    if accelerator.is_main_process:
        print(f"\n{cfg.name}: clean test top-1 {m['test_top1']:.2f}%  top-5 {m['test_top5']:.2f}%  "
              f"({m['test_samples']} test images; {m['steps']} steps = {m['epochs']:.1f} epochs; "
              f"{m['images_per_s']:.0f} img/s; {m['train_time_s']:.0f} s training on {m['world_size']} process(es))")
        print(f"wrote {run_dir / 'metrics.json'}, {run_dir / 'curve.csv'}, checkpoints in {run_dir / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
