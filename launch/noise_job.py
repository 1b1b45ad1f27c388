"""Shared runner of launch/sem.py, rem.py, em.py (one code path; each script only fixes the method)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List, Optional

from uedist.config import ConfigError, load_config, save_config
from uedist.dist import get_logger, make_accelerator, setup_logging
from uedist.engine.loop import NonFiniteLoss
from uedist.engine.noise import NoiseConfig

log = get_logger("uedist.launch.noise")
REPO = Path(__file__).resolve().parents[1]


def run(method: str, doc: str, argv: Optional[List[str]] = None, default_config: Optional[str] = None) -> int:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML (configs/{method}/)" + (f"; default {default_config}" if default_config else ""))
    p.add_argument("overrides", nargs="*", help="key=value, e.g. steps=100 eps=8 data.train=shards/x/train")
    args = p.parse_args(argv)
    path = args.config or (str(REPO / default_config) if default_config else None)
    try:
        cfg = load_config(NoiseConfig, path, [f"method={method}", *args.overrides])
    except ConfigError as e:
        p.error(str(e))
    accelerator = make_accelerator()
    run_dir = Path(cfg.run_root) / cfg.name
    setup_logging(run_dir)
    t0 = time.time()
    if not Path(cfg.data.train, "manifest.json").is_file() and cfg.data.build:
        _build_missing(cfg, accelerator)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    try:
        if method == "em":
            from uedist.engine.em import generate_em

            s = generate_em(cfg, accelerator, run_dir)
        else:
            from uedist.engine.noise import generate_noise

            s = generate_noise(cfg, accelerator, run_dir)
    except NonFiniteLoss as e:
        log.error("%s", e)
        return 3
    if accelerator.is_main_process:
        print(summary_text(s, time.time() - t0, run_dir))
    return 0


def _build_missing(cfg: NoiseConfig, accelerator) -> None:
    from uedist.data.build import BuildConfig, build_shard_sets

    build_cfg = load_config(BuildConfig, REPO / cfg.data.build if not Path(cfg.data.build).is_file() else cfg.data.build)
    if accelerator.is_main_process:
        log.info("%s is missing: building it from %s", cfg.data.train, cfg.data.build)
        build_shard_sets(build_cfg)
    accelerator.wait_for_everyone()
    if not Path(cfg.data.train, "manifest.json").is_file():
        raise FileNotFoundError(f"{cfg.data.build} did not produce {cfg.data.train} (check its `out`)")


def summary_text(s: dict, wall: float, run_dir: Path) -> str:
    n = s["noise"]
    lines = [
        "",
        f"{s['method'].upper()} noise: {s['name']}",
        f"  poisoned shard set   {s['poisoned']}  ({n['samples']} samples written in this run)",
        f"  noise                L∞ max {n['linf_max']:.0f}/255 (ε = {s['eps']:.0f}/255, 0 violations), "
        f"mean L2 {n['l2_mean']:.1f}/255 per image",
    ]
    if "surrogate_acc_poisoned" in s:
        lines.append(f"  surrogate            {s['surrogate_acc_poisoned']:.2f}% on the poisoned train set"
                     + (f", {s['surrogate_acc_clean_test']:.2f}% on the clean test set" if "surrogate_acc_clean_test" in s else ""))
    if "rounds" in s:
        lines.append(f"  EM rounds            {s['rounds']} (surrogate error on x+δ {s['final_error']:.4f})")
    t = s["timings"]
    lines.append("  time                 " + ", ".join(f"{k.replace('_s', '')} {v:.1f}s" for k, v in t.items())
                 + f", total {wall:.1f}s")
    lines.append(f"  wrote                {run_dir / 'metrics.json'}, {run_dir / 'config.yaml'}")
    victim = "synthetic" if "synthetic" in str(s["train"]) else "<victim config>"
    lines.append(f"  next                 accelerate launch launch/victim.py --config configs/victim/{victim}.yaml "
                 f"data.train={s['poisoned']} name={s['name']}_victim")
    return "\n".join(lines)
