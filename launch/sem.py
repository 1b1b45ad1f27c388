"""The main job: generate SEM (stable error-minimizing) noise and write the poisoned shard set.

    accelerate launch launch/sem.py        # demo: builds the synthetic set if absent, SEM at demo scale (minutes)
    accelerate launch launch/sem.py --config configs/sem/cifar10.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/cpu2.yaml launch/sem.py   # 2 processes

The same as ``launch/attack.py`` with the method fixed to sem. Prints where the poisoned shard set is and a summary
(noise L∞/L2, surrogate accuracy on the poisoned data, time per stage). Resumes by default: rerun after a kill.
"""

import sys

from uedist.app.stages import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("attack", sys.argv[1:], doc=__doc__, method="sem", default_config="configs/sem/demo.yaml"))
