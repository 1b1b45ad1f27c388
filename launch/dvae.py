"""Purify a poisoned shard set with D-VAE (two stages, Algorithm 1 of Yu et al., ICML 2024); launch/purify.py with
the method fixed to dvae.

    accelerate launch launch/dvae.py --config configs/dvae/cifar10.yaml data.src=runs/sem_c10/poisoned
    accelerate launch launch/dvae.py --config configs/dvae/cifar10_cpu.yaml data.src=... data.clean=... name=...
    accelerate launch --config_file configs/accelerate/cpu2.yaml launch/dvae.py --config ...   # 2 CPU processes

Writes runs/<name>/: config.yaml, logs/, stage1/ and stage2/ checkpoints, the shard sets p1/, p2/ and purified/
(or `out`), stage{1,2}_curve.csv, grid.png (poisoned | p̂ | P¹ | P² | purified | clean), metrics.json (KLD,
reconstruction error, PSNR against the clean set when `data.clean` is given). Resumes by default: rerun the same
command after a kill. Exit code 2: bad config or input; 3: non-finite loss.
"""

import sys

from uedist.app.stages import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("purify", sys.argv[1:], doc=__doc__, method="dvae"))
