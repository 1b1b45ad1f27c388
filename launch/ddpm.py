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
from __future__ import annotations

import sys
from typing import List, Optional

from uedist.dist import get_logger
from uedist.jobs import guarded, start_job
from uedist.engine.ddpm import DDPMConfig, train_ddpm

log = get_logger("uedist.launch.ddpm")


def main(argv: Optional[List[str]] = None) -> int:
    cfg, accelerator, run_dir = start_job(DDPMConfig, __doc__, "configs/ddpm/",
                                          "steps=1000 unet.args.ch=64 data.train=shards/x/test", argv)
    m = guarded(lambda: train_ddpm(cfg, accelerator, run_dir), log)  # DDP, or DeepSpeed when cfg.deepspeed is set
    if isinstance(m, int):
        return m
    if accelerator.is_main_process:
        print(f"\n{cfg.name}: DDPM {cfg.unet.name} ({m['params'] / 1e6:.2f} M parameters), {m['steps']} steps on "
              f"{cfg.data.train}; final loss {m['final_loss']}; {m['images_per_s']:.1f} img/s on "
              f"{m['world_size']} process(es){' with DeepSpeed' if cfg.deepspeed else ''}")
        print(f"wrote {run_dir / 'metrics.json'}, {run_dir / 'curve.csv'}"
              + (f", {m['samples']}" if m.get("samples") else "") + f", checkpoints in {run_dir / 'checkpoints'}")
        print(f"next: accelerate launch launch/jcdp.py --config configs/jcdp/<name>.yaml ddpm={run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
