"""Train a victim classifier on a shard set and evaluate it on a clean test shard set.

    accelerate launch launch/victim.py --config configs/victim/cifar10_quick.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/cpu2.yaml launch/victim.py --config ... # 2 CPU processes

Writes runs/<name>/: config.yaml, logs/rank*.log, checkpoints/, curve.csv, metrics.json. Resumes by default.
"""

import sys

from uedist.app.stages import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("victim", sys.argv[1:], doc=__doc__, default_method="victim"))
