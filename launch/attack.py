"""Protect a dataset: run any registered attack (SEM, REM, EM, random, TAP, SEP, NTGA, LSP, AR, OPS) and write
the poisoned shard set.

    accelerate launch launch/attack.py --config configs/<method>/<dataset>.yaml [key=value ...]
    accelerate launch launch/attack.py --config configs/sem/cifar10.yaml steps=1000 name=sem_c10
    accelerate launch --config_file configs/accelerate/cpu2.yaml launch/attack.py --config ...   # 2 processes

The config's ``method`` picks the stage (``uedist stages`` lists them). Prints where the poisoned shard set is and
a summary (noise L∞/L2, surrogate accuracy, time per phase). Resumes by default: rerun the same command after a kill.
"""

import sys

from uedist.app.stages import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("attack", sys.argv[1:], doc=__doc__))
