"""Generate EM (error-minimizing, sample-wise or class-wise) noise and write the poisoned shard set.

    accelerate launch launch/em.py --config configs/em/cifar10.yaml [em.mode=classwise ...]
"""
import sys

from noise_job import run

if __name__ == "__main__":
    sys.exit(run("em", __doc__, default_config="configs/em/demo.yaml"))
