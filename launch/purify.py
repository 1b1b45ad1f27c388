"""Break a protection: run any registered purifier on a poisoned shard set and write the purified set.

    accelerate launch launch/purify.py --config configs/purify/jpeg10.yaml data.src=runs/sem_c10/poisoned
    accelerate launch launch/purify.py --config configs/dvae/cifar10.yaml data.src=runs/sem_c10/poisoned
    accelerate launch launch/purify.py --config configs/jcdp/cifar10.yaml data.src=... ddpm=runs/<ddpm run>
    accelerate launch launch/purify.py method=median data.src=... data.clean=shards/cifar10_jpg/train name=med_sem

The config's ``method`` picks the purifier (dvae, jcdp, diffusion, jpeg, grayscale, bit_depth, mean, median,
gaussian, ...; ``uedist stages`` lists them). Writes runs/<name>/: config.yaml, logs/, purified/ (or ``out``),
grid.png, metrics.json (time; PSNR against the clean set when ``data.clean`` is given). Resumes after a kill.
"""

import sys

from uedist.app.stages import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("purify", sys.argv[1:], doc=__doc__))
