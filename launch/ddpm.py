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

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from uedist.config import ConfigError, load_config, save_config
from uedist.dist import get_logger, make_accelerator, setup_logging
from uedist.engine.ddpm import DDPMConfig, train_ddpm
from uedist.engine.loop import NonFiniteLoss

log = get_logger("uedist.launch.ddpm")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML (configs/ddpm/)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. steps=1000 unet.args.ch=64 data.train=shards/x/test")
    args = p.parse_args(argv)
    try:
        cfg = load_config(DDPMConfig, args.config, args.overrides)
    except ConfigError as e:
        p.error(str(e))
    accelerator = make_accelerator()
    run_dir = Path(cfg.run_root) / cfg.name
    setup_logging(run_dir)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    try:
        m = train_ddpm(cfg, accelerator, run_dir)  # DDP, or DeepSpeed when cfg.deepspeed names a JSON config
    except NonFiniteLoss as e:
        log.error("%s", e)
        return 3
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
