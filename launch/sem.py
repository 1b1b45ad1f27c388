"""The main job: generate SEM (stable error-minimizing) noise and write the poisoned shard set.

    accelerate launch launch/sem.py        # demo: builds the synthetic set if absent, SEM at demo scale, minutes on a CPU
    accelerate launch launch/sem.py --config configs/sem/cifar10.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/cpu2.yaml launch/sem.py   # 2 processes

Prints where the poisoned shard set is and a summary (noise L∞/L2, surrogate accuracy on the poisoned data, time
per stage). Resumes by default: rerun the same command after a kill.
"""
import sys

from noise_job import run

if __name__ == "__main__":
    sys.exit(run("sem", __doc__, default_config="configs/sem/demo.yaml"))
