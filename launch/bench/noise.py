"""Noise generation throughput and memory.

    python launch/bench/noise.py [--out runs/bench/noise] [--width 1.0] [--quick]

1. Images/s of one SEM and one REM surrogate step (fresh δ for the batch + one adversarially trained SGD step)
   and of the final pass (δ only, surrogate frozen), at 32 px (CIFAR reference settings: K_u 10, J 5, K_a 10) and
   at 256 px stored / RRC 224 (ImageNet-100 settings: K_u 7, J 4, K_a 7), fp32 vs bf16 + channels_last, with the
   forward/backward passes per image counted and the SEM/REM step-cost ratio.
2. Peak RSS of the final pass (a subprocess each) over N and 4N samples: it must not grow with the dataset.
Writes <out>/noise.json and <out>/noise.md. ``--quick``: one δ / attack / EoT step, width 1/8, N = 200 (a smoke
run, not a measurement).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from uedist.benchmark import Setting, fake_manifest, machine_info, markdown_table, noise_steps, timed, write_report
from uedist.config import load_config
from uedist.dist import make_accelerator
from uedist.engine.noise import NoiseConfig

SETTINGS = {
    32: ["noise_steps=10", "noise_step_size=1.6", "eot_samples=5", "adv_steps=10", "adv_step_size=0.8"],
    256: [
        "noise_steps=7",
        "noise_step_size=2",
        "eot_samples=4",
        "adv_steps=7",
        "adv_step_size=1",
        "augment=rrc_flip",
        "train_size=224",
    ],
}
QUICK = ["noise_steps=1", "eot_samples=1", "adv_steps=1"]


def bench_steps(
    s: Setting, px: int, *, batch: int, width: float, accelerator: Any, min_time: float, max_iters: int
) -> list[dict[str, Any]]:
    """SEM and REM rows at ``px``: one surrogate step and one final pass each."""
    rows = []
    for method in ("sem", "rem"):
        bf16 = str(s.bf16).lower()
        cfg = load_config(
            NoiseConfig,
            None,
            [
                f"method={method}",
                f"surrogate.width={width}",
                "surrogate.stem=cifar",
                f"bf16={bf16}",
                f"channels_last={bf16}",
                *SETTINGS[px],
                *(QUICK if s.quick else []),
            ],
        )
        cases = noise_steps(cfg, fake_manifest(px, 10), batch=batch, accelerator=accelerator)
        for what, (fn, passes) in cases.items():
            dt = timed(fn, min_time, max_iters)
            rows.append(
                {
                    "method": method,
                    "what": what,
                    "px": px,
                    "batch": batch,
                    "width": width,
                    "precision": s.precision,
                    "fwd_bwd_per_image": passes,
                    "images_per_s": batch / dt,
                    "s_per_batch": dt,
                }
            )
            print(
                f"{method} {what:14s} {px}px {'bf16' if s.bf16 else 'fp32'} {batch / dt:9.3f} img/s "
                f"({passes} passes/img)",
                flush=True,
            )
    return rows


def rem_sem_ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per resolution and precision: REM / SEM surrogate-step time and forward+backward passes."""
    ratios = {}
    for px in SETTINGS:
        for prec in ("fp32", "bf16+cl"):
            step = {
                r["method"]: r for r in rows if (r["px"], r["precision"], r["what"]) == (px, prec, "surrogate step")
            }
            sem, rem = step["sem"], step["rem"]
            ratios[f"{px}px {prec}"] = {
                "time_ratio_rem_over_sem": sem["images_per_s"] / rem["images_per_s"],
                "pass_ratio": rem["fwd_bwd_per_image"] / sem["fwd_bwd_per_image"],
            }
    return ratios


def peak_rss(n: int, tmp: Path) -> float:
    """Peak RSS (MiB) of a subprocess that builds N synthetic samples and writes their random-noise poisoned set."""
    code = f"""
import resource
from pathlib import Path
from uedist.benchmark import build_synthetic_set
from uedist.config import load_config
from uedist.dist import make_accelerator
from uedist.engine.noise import NoiseConfig, random_delta, write_poisoned
train = build_synthetic_set(Path("{tmp}/d{n}"), num_train={n}, size=64, shard_size=500)
cfg = load_config(NoiseConfig, None, [f"data.train={{train}}", "method=random", "out={tmp}/p{n}", "progress=false",
    "data.workers=0"])
write_poisoned(cfg, make_accelerator(), Path("{tmp}"), make_delta=random_delta(cfg), stage="bench")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[-1]) / 1024


def to_markdown(res: dict[str, Any], width: float) -> str:
    rss = res["memory"]
    md = [f"Noise generation on {res['device']} ({res['threads']} threads), surrogate ResNet-18 width {width}.", ""]
    md += markdown_table(
        ["method", "what", "px", "batch", "precision", "fwd+bwd / image", "images/s"],
        [
            (
                r["method"],
                r["what"],
                r["px"],
                r["batch"],
                r["precision"],
                r["fwd_bwd_per_image"],
                f"{r['images_per_s']:.3f}",
            )
            for r in res["rows"]
        ],
        "llrrlrr",
    )
    md += [""] + markdown_table(
        ["setting", "REM/SEM step time", "REM/SEM passes"],
        [(k, f"{v['time_ratio_rem_over_sem']:.2f}", f"{v['pass_ratio']:.2f}") for k, v in res["ratios"].items()],
        "lrr",
    )
    md += [
        "",
        (
            f"Peak RSS of the final pass (64 px random noise): N = {rss['N']}: {rss['rss_N_mib']:.0f} MiB; "
            f"4N = {4 * rss['N']}: {rss['rss_4N_mib']:.0f} MiB."
        ),
    ]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/noise")
    p.add_argument("--width", type=float, default=None, help="surrogate ResNet-18 width (default 1.0; quick 0.125)")
    p.add_argument("--batch-32", type=int, default=8)
    p.add_argument("--batch-256", type=int, default=2)
    p.add_argument("--rss-n", type=int, default=2000, help="N for the peak-RSS comparison (N vs 4N, 64 px)")
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    acc = make_accelerator()
    width = args.width if args.width is not None else (0.125 if args.quick else 1.0)
    rows: list[dict[str, Any]] = []
    for px, batch in ((32, args.batch_32), (256, args.batch_256)):
        for bf16 in (False, True):
            s = Setting(acc.device, bf16=bf16, quick=args.quick)
            min_time, iters = s.limits(args.min_time, 20)
            rows += bench_steps(s, px, batch=batch, width=width, accelerator=acc, min_time=min_time, max_iters=iters)
    with tempfile.TemporaryDirectory() as tmp:
        n = 200 if args.quick else args.rss_n
        rss = {"N": n, "rss_N_mib": peak_rss(n, Path(tmp)), "rss_4N_mib": peak_rss(4 * n, Path(tmp))}
    res = {**machine_info(acc.device), "quick": args.quick, "rows": rows, "ratios": rem_sem_ratios(rows), "memory": rss}
    md = to_markdown(res, width)
    paths = write_report(Path(args.out), "noise", res, markdown=md)
    print(md + "wrote " + " and ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
