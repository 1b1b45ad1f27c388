"""Shared runner of launch/sem.py, rem.py, em.py (one code path; each script only fixes the method)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

from uedist.config import load_config
from uedist.dist import get_logger
from uedist.jobs import guarded, start_job
from uedist.engine.noise import NoiseConfig

log = get_logger("uedist.launch.noise")
REPO = Path(__file__).resolve().parents[1]


def run(method: str, doc: str, argv: Optional[List[str]] = None, default_config: Optional[str] = None) -> int:
    t0 = time.time()
    cfg, accelerator, run_dir = start_job(NoiseConfig, doc, f"configs/{method}/",
                                          "steps=100 eps=8 data.train=shards/x/train", argv,
                                          str(REPO / default_config) if default_config else None, (f"method={method}",))
    if cfg.data.build:
        err = _build_or_check(cfg, accelerator)
        if err:
            return err
    if method == "em":
        from uedist.engine.em import generate_em as generate
    else:
        from uedist.engine.noise import generate_noise as generate
    s = guarded(lambda: generate(cfg, accelerator, run_dir), log)
    if isinstance(s, int):
        return s
    if accelerator.is_main_process:
        print(summary_text(s, time.time() - t0, run_dir))
    return 0


def _build_or_check(cfg: NoiseConfig, accelerator) -> int:
    """Build ``data.train`` from ``data.build`` when it is missing; when it exists, check it is what ``data.build``
    builds now (a set left by an older synthetic generator is refused, not silently used). Returns an exit code."""
    from uedist.data.build import BuildConfig, build_shard_sets, stale_message

    build_cfg = load_config(BuildConfig, REPO / cfg.data.build if not Path(cfg.data.build).is_file() else cfg.data.build)
    if Path(cfg.data.train, "manifest.json").is_file():
        msg = stale_message(build_cfg, cfg.data.build)  # every rank decides alike, so all exit together
        if msg and accelerator.is_main_process:
            log.error("%s", msg)
        return 2 if msg else 0
    if accelerator.is_main_process:
        log.info("%s is missing: building it from %s", cfg.data.train, cfg.data.build)
        build_shard_sets(build_cfg)
    accelerator.wait_for_everyone()
    if not Path(cfg.data.train, "manifest.json").is_file():
        raise FileNotFoundError(f"{cfg.data.build} did not produce {cfg.data.train} (check its `out`)")
    return 0


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
    train = Path(str(s["train"]))
    victim, test = "<victim config>", ""
    if train.parent.name.startswith("synthetic"):  # the built-in sets: the synthetic victim, on this set's own test split
        victim = "synthetic"
        test = "" if train.parent.name == "synthetic" else f" data.test={train.parent / 'test'}"
    lines.append(f"  next                 accelerate launch launch/victim.py --config configs/victim/{victim}.yaml "
                 f"data.train={s['poisoned']}{test} name={s['name']}_victim")
    return "\n".join(lines)
