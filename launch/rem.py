"""Generate REM (robust error-minimizing) noise and write the poisoned shard set.

    accelerate launch launch/rem.py --config configs/rem/cifar10.yaml [key=value ...]
"""
import sys

from noise_job import run

if __name__ == "__main__":
    sys.exit(run("rem", __doc__, default_config="configs/rem/demo.yaml"))
