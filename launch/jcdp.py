"""Purify an unlearnable shard set with a trained DDPM: JCDP (LE paper Algorithm 1) or plain diffusion
(``method: diffusion``); launch/purify.py with a jcdp / diffusion config.

    accelerate launch launch/jcdp.py --config configs/jcdp/cifar10.yaml ddpm=runs/<ddpm run>
    accelerate launch launch/jcdp.py --config configs/jcdp/cifar10_cpu.yaml                 # CPU scale
    accelerate launch launch/jcdp.py --config configs/jcdp/cifar10_cpu_plain.yaml           # the plain baseline
    accelerate launch --config_file configs/accelerate/cpu2.yaml launch/jcdp.py ...         # 2 processes

Writes runs/<name>/: config.yaml, logs/, purified/ (the shard set), grid.png (poisoned | purified lines),
metrics.json (time, images/s, PSNR to the poisoned and, with data.clean, to the clean images). Resumes by
shard: rerun the same command after a kill. Then train a victim on it:
    accelerate launch launch/victim.py --config configs/victim/cifar10_quick.yaml data.train=runs/<name>/purified
"""

import sys

from uedist.app.stages import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("purify", sys.argv[1:], doc=__doc__, default_method="jcdp"))
