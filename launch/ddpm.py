"""Train or fine-tune the DDPM that JCDP / plain diffusion purification use, on any unprotected shard set.

    accelerate launch launch/ddpm.py --config configs/ddpm/cifar10.yaml [key=value ...]
    accelerate launch launch/ddpm.py --config configs/ddpm/cifar10_cpu.yaml          # CPU scale (minutes)
    accelerate launch launch/ddpm.py --config configs/ddpm/cifar10_finetune.yaml init=runs/<ddpm run>
    accelerate launch --config_file configs/accelerate/cpu2.yaml launch/ddpm.py ...   # 2 CPU processes (DDP)
    torchrun --nproc_per_node 2 launch/ddpm.py --config configs/ddpm/imagenet256.yaml \
        deepspeed=configs/deepspeed/zero2_bf16.json                                   # DeepSpeed ZeRO-2

Writes runs/<name>/: config.yaml, logs/, checkpoints/ (model, EMA, optimizer, RNG, data position), curve.csv,
samples.png (EMA samples), metrics.json. Resumes by default: rerun the same command after a kill.
"""

import sys

from uedist.app.stages import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("ddpm", sys.argv[1:], doc=__doc__, default_method="ddpm"))
