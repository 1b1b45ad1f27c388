"""Purify an unlearnable shard set with a trained DDPM: JCDP (LE paper Algorithm 1) or plain diffusion.

    accelerate launch launch/jcdp.py --config configs/jcdp/cifar10.yaml ddpm=runs/<ddpm run>
    accelerate launch launch/jcdp.py --config configs/jcdp/cifar10_cpu.yaml                 # CPU scale
    accelerate launch launch/jcdp.py --config configs/jcdp/cifar10_cpu_plain.yaml           # the plain baseline
    accelerate launch --config_file configs/accelerate/cpu2.yaml launch/jcdp.py ...         # 2 processes

Writes runs/<name>/: config.yaml, logs/, purified/ (the shard set), grid.png (poisoned | purified lines),
metrics.json (time, images/s, PSNR to the poisoned and, with data.clean, to the clean images). Resumes by
shard: rerun the same command after a kill. Then train a victim on it:
    accelerate launch launch/victim.py --config configs/victim/cifar10_quick.yaml data.train=runs/<name>/purified
"""
from __future__ import annotations

import sys
from typing import List, Optional

from uedist.dist import get_logger
from uedist.jobs import start_job
from uedist.engine.jcdp import JCDPConfig, purify_shards

log = get_logger("uedist.launch.jcdp")


def main(argv: Optional[List[str]] = None) -> int:
    cfg, accelerator, run_dir = start_job(
        JCDPConfig, __doc__, "configs/jcdp/", "ddpm=runs/ddpm_c10 t_p=20 rounds=4 method=plain", argv,
        check=lambda c: None if c.ddpm else "ddpm=<DDPM run folder> is required (train one with launch/ddpm.py)")
    m = purify_shards(cfg, accelerator, run_dir)
    if accelerator.is_main_process:
        guide = (f"λ₁ {cfg.lam_mse:g} (MSE, t in {list(cfg.mse_t)}), λ₂ {cfg.lam_lpips:g} (LPIPS-{cfg.lpips.net}, "
                 f"t in {list(cfg.lpips_t)}, trunk {cfg.lpips.backbone})" if m["guided"] else "no guidance")
        print(f"\n{cfg.name}: {cfg.method} purification, N {cfg.rounds} x T_p {cfg.t_p} (stride {cfg.stride}), {guide}")
        print(f"  purified shard set  {m['purified']}  ({m['num_samples']} samples; {m['samples']} written in this run)")
        if m["samples"]:
            extra = (f", to clean {m['psnr_to_clean']:.2f} dB (poisoned to clean {m['psnr_poisoned_to_clean']:.2f} dB)"
                     if "psnr_to_clean" in m else "")
            print(f"  PSNR                to poisoned {m['psnr_to_poisoned']:.2f} dB{extra}")
            print(f"  time                {m['time_s']:.1f} s, {m['images_per_s']:.2f} img/s on {m['world_size']} process(es)")
        print(f"  wrote               {run_dir / 'metrics.json'}" + (f", {m['grid']}" if m.get("grid") else ""))
        print(f"  next                accelerate launch launch/victim.py --config configs/victim/cifar10_quick.yaml "
              f"data.train={m['purified']} name={cfg.name}_victim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
