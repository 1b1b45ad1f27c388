"""ImageNet-scale timing: every stage at its real resolution and model size, FLOPs, and wall-clock extrapolations.

    python launch/bench/bench.py [--out runs/bench/all] [--stages sem_step,rem_step,...] [--quick]

For each stage: images/s on this device (one process) at the real settings (ImageNet-100: 256 px stored, 224 px
crops, full-width ResNet-18, the 256 px UNet, the ImageNet-100 D-VAE), the FLOPs per image counted with
``torch.utils.flop_counter`` (matmul/conv, forward and backward, as executed), the achieved FLOP/s against the
device's peak (a large GEMM in the same precision, measured in the same run; the datasheet figure of known GPUs
is stated beside it), and the
stage's wall-clock for ImageNet-100 (≈130k train images) and Facescrub on 1, 8 and 64 devices.

Extrapolation model (stated, not measured): work = images the stage processes at the reference settings (table
``WORKLOADS`` below, from the configs); time = work / (images/s per device × devices), i.e. perfect data-parallel
scaling. Real multi-device runs lose some of that to communication and input pipelines, so read the 8- and
64-device columns as lower bounds. The loader row is per loader *process* (decode + crop on the host CPU).

Writes <out>/bench.json and <out>/bench.md. ``--quick`` shrinks everything (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch

from uedist.bench.fixtures import build_synthetic_set, fake_manifest, random_batch
from uedist.bench.report import fmt_duration, markdown_table, write_report
from uedist.bench.steps import classifier_step, dvae_steps, eps_model, noise_steps, unet_steps
from uedist.bench.timing import Setting, Step, count_flops, device_name, gemm_rate, machine_info, timed
from uedist.config import load_config
from uedist.data.loaders import make_train_loader
from uedist.diffusion.purify import jcdp_guidance, purify
from uedist.diffusion.schedule import Schedule
from uedist.dist import make_accelerator
from uedist.engine.attacks.sem_rem import SEMConfig
from uedist.engine.purifiers.dvae import DVAEConfig, build_dvae
from uedist.engine.train.ddpm import DDPMConfig
from uedist.engine.train.victim import VictimConfig
from uedist.models.lpips import build_lpips
from uedist.models.resnet import resnet18
from uedist.models.unet import UNETS
from uedist.ops.augment import random_resized_crop_flip

REPO = Path(__file__).resolve().parents[2]

# Datasheet dense peaks (FLOP/s) for the accelerators we expect; CPUs get a measured GEMM rate instead.
PEAKS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
}

# Train-set sizes and per-stage work (images processed) at the reference settings of the configs.
DATASETS = {"imagenet100": 130_000, "facescrub": 85_000}  # Facescrub: ≈106k images of 530 people, 80% train
# Facescrub is stored at 112 px: its per-image cost is taken as the measured 256 px one times the pixel ratio
# (convolution cost is linear in pixels), an estimate, not a measurement; the loader is not rescaled.
PIXEL_SCALE = {"imagenet100": 1.0, "facescrub": (256 / 112) ** 2}
DEVICES = (1, 8, 64)


def workloads(n: int, ds: str) -> dict[str, float]:
    """Images processed by each stage for a train set of ``n`` images (see the configs named)."""
    sem = load_config(SEMConfig, REPO / f"configs/sem/{ds}.yaml")
    victim_epochs = load_config(VictimConfig, REPO / f"configs/victim/{ds}.yaml").epochs
    dvae = load_config(DVAEConfig, REPO / f"configs/dvae/{ds}.yaml").epochs
    ddpm = load_config(DDPMConfig, REPO / "configs/ddpm/imagenet256.yaml")
    return {
        "loader": n,  # one epoch of decode + augment
        "sem_step": sem.steps * sem.data.batch_size,  # M steps of batch B (configs/sem/<ds>.yaml)
        "rem_step": sem.steps * sem.data.batch_size,  # same M, B for REM (configs/rem/<ds>.yaml)
        "final_pass": n,  # δ for every sample, surrogate frozen
        "victim_train": victim_epochs * n,  # configs/victim/<ds>.yaml
        "dvae_train": 2 * dvae * n,  # two stages (Algorithm 1), configs/dvae/<ds>.yaml epochs each
        "dvae_infer": 3 * n,  # P1, P2, P3 passes
        "ddpm_train": ddpm.steps * ddpm.data.batch_size,  # configs/ddpm/imagenet256.yaml (from scratch)
        "jcdp_purify": n,  # N rounds × T_p steps per image are inside the measured images/s
    }


# --------------------------------------------------------------------------------------------------------- stages
class Case(NamedTuple):
    """One timed stage: ``fn()`` processes ``images`` images; ``what`` says how, for the table. The stage's
    per-image work is ``factor`` calls' worth (a call timing a representative slice of a longer pass)."""

    fn: Step
    images: int
    what: str
    factor: float = 1


def sizes(s: Setting) -> tuple[int, int]:
    """(stored px, crop px): ImageNet-100's 256 / 224, or 64 / 56 in quick mode."""
    return (64, 56) if s.quick else (256, 224)


def loader(s: Setting) -> Case:
    px, crop = sizes(s)
    n = 64 if s.quick else 512
    train = build_synthetic_set(
        Path(tempfile.mkdtemp(prefix="uedist_bench_")), num_train=n, size=px, shard_size=128, encoding="jpg"
    )
    gen = torch.Generator().manual_seed(0)

    def run() -> None:
        for b in make_train_loader(train, batch_size=32, num_steps=n // 32, num_workers=0):
            random_resized_crop_flip(b["image"].float().div(255), crop, gen=gen)

    return Case(run, n, f"{n} JPEG {px} px, decode + RRC {crop} + flip, 1 process")


def noise_config(s: Setting, method: str) -> SEMConfig:
    """The ImageNet-100 reference SEM / REM settings (configs/{sem,rem}/imagenet100.yaml), tiny in quick mode."""
    bf16 = str(s.bf16).lower()
    over = [
        f"method={method}",
        "surrogate.width=1.0",
        "surrogate.stem=cifar",
        "noise_steps=7",
        "noise_step_size=2",
        "eot_samples=4",
        "adv_steps=7",
        "adv_step_size=1",
        "augment=rrc_flip",
        f"train_size={sizes(s)[1]}",
        f"bf16={bf16}",
        f"channels_last={bf16}",
    ]
    if s.quick:
        over += ["noise_steps=1", "eot_samples=1", "adv_steps=1", "surrogate.width=0.125"]
    return load_config(SEMConfig, None, over)


def noise_case(s: Setting, method: str, what: str) -> Case:
    cfg, b = noise_config(s, method), s.batch(32, 1)
    fn, passes = noise_steps(cfg, fake_manifest(sizes(s)[0], 100), batch=b, accelerator=make_accelerator())[what]
    if what == "final pass":
        return Case(fn, b, f"SEM δ only: {passes} fwd+bwd/img")
    return Case(
        fn,
        b,
        f"ResNet-18 w{cfg.surrogate.width:g}, K_u {cfg.noise_steps}, J {cfg.eot_samples}, "
        f"K_a {cfg.adv_steps}: {passes} fwd+bwd/img",
    )


def victim_train(s: Setting) -> Case:
    model = s.place(resnet18(num_classes=100, width=0.125 if s.quick else 1.0, stem="imagenet"))
    x, y = random_batch(s.batch(256, 4), sizes(s)[1], 100, device=s.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Case(
        classifier_step(model, x, y, opt=opt, amp=s.amp),
        len(y),
        f"ResNet-18 (ImageNet stem) at {sizes(s)[1]} px, one SGD step",
    )


def dvae_case(s: Setting, what: str) -> Case:
    px = sizes(s)[0]
    cfg = load_config(DVAEConfig, REPO / "configs/dvae/imagenet100.yaml", ["model.width=0.125"] if s.quick else [])
    model = s.place(build_dvae(cfg, fake_manifest(px, 100)))
    x, y = random_batch(s.batch(64, 2) if what == "train step" else s.batch(128, 4), px, 100, device=s.device)
    fn = dvae_steps(model, x, y, amp=s.amp, grad_clip=cfg.grad_clip)[what]
    how = "one Adam step" if what == "train step" else "forward to P = x − p̂"
    return Case(fn, len(y), f"D-VAE (configs/dvae/imagenet100.yaml) at {px} px, {how}")


def unet(s: Setting) -> torch.nn.Module:
    kw = {"ch": 16, "ch_mult": (1, 2), "image_size": sizes(s)[0], "attn_resolutions": ()} if s.quick else {}
    return s.place(UNETS.build("ddpm_256", **kw))


def ddpm_train(s: Setting) -> Case:
    px = sizes(s)[0]
    x = torch.rand(s.batch(16, 1), 3, px, px, device=s.device) * 2 - 1
    return Case(unet_steps(unet(s), x, amp=s.amp)["ddpm_train"], len(x), f"UNet ddpm_256 at {px} px, one Adam step")


def jcdp_purify(s: Setting) -> Case:
    px = sizes(s)[0]
    net = unet(s).eval().requires_grad_(False)
    lp = build_lpips("alex", backbone="random").to(s.device).eval().requires_grad_(False)  # same cost as pretrained
    # One measured call = one MSE-guided step (t = 2) + one LPIPS-guided step (t = 1). The reference round
    # (T_p = 20: MSE for t > 10, LPIPS for t <= 10) is 10 of each, N = 4 rounds: 40 such pairs per image.
    pairs = 1 if s.quick else 40
    guide = jcdp_guidance(lp, lam_mse=100.0, lam_lpips=1000.0, mse_t=(2, 1000), lpips_t=(1, 1))
    x = torch.rand(s.batch(16, 1), 3, px, px, device=s.device) * 2 - 1
    eps, sched = eps_model(net, s.amp), Schedule.linear(1000)

    def run() -> None:
        purify(eps, sched, x, t_p=2, rounds=1, gen=torch.Generator().manual_seed(0), guide=guide)

    return Case(
        run,
        len(x),
        f"JCDP N 4 × T_p 20 (10 MSE- + 10 LPIPS(alex)-guided steps per round) with UNet "
        f"ddpm_256 at {px} px; measured 1 + 1 steps, × {pairs}",
        pairs,
    )


STAGE_FNS: dict[str, Callable[[Setting], Case]] = {
    "loader": loader,
    "sem_step": partial(noise_case, method="sem", what="surrogate step"),
    "rem_step": partial(noise_case, method="rem", what="surrogate step"),
    "final_pass": partial(noise_case, method="sem", what="final pass"),
    "victim_train": victim_train,
    "dvae_train": partial(dvae_case, what="train step"),
    "dvae_infer": partial(dvae_case, what="inference"),
    "ddpm_train": ddpm_train,
    "jcdp_purify": jcdp_purify,
}
STAGES = list(STAGE_FNS)


# ------------------------------------------------------------------------------------------------------ measuring
def run_stage(s: Setting, name: str, *, min_time: float) -> dict[str, Any]:
    """One table row: images/s, FLOPs per image (counted on the warm-up call) and achieved FLOP/s of a stage."""
    case = STAGE_FNS[name](s)
    flops = 0.0 if name == "loader" else count_flops(case.fn) * case.factor
    dt = timed(case.fn, min_time) * case.factor
    return {
        "stage": name,
        "what": case.what,
        "images_per_call": case.images,
        "s_per_call": dt,
        "images_per_s": case.images / dt,
        "flops_per_image": flops / case.images if flops else None,
        "achieved_flops": flops / dt if flops else None,
    }


def peak_flops(device: torch.device, precision: str, quick: bool) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): a large GEMM in the stages' precision, measured in this run (CPUs
    with AMX run bf16 several times faster); for known GPUs the datasheet figure is stated beside it."""
    name = device_name(device)
    n = 256 if quick else (8192 if device.type == "cuda" else 2048)
    rate = gemm_rate(device, torch.bfloat16 if precision == "bf16" else torch.float32, n)
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else name
    source = f"measured {precision} GEMM {n}², {where}"
    for k, v in PEAKS.items():
        if device.type == "cuda" and k in name:
            source += f"; datasheet {k} dense {precision}: {v[precision] / 1e12:.0f} TFLOP/s"
    return rate, source


def extrapolate(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Seconds per dataset, stage and device count: work / (images/s × devices × pixel scale)."""
    out = {}
    for ds, n in DATASETS.items():
        w = workloads(n, ds)
        out[ds] = {
            r["stage"]: {
                str(d): w[r["stage"]] / (r["images_per_s"] * d * (1.0 if r["stage"] == "loader" else PIXEL_SCALE[ds]))
                for d in DEVICES
            }
            for r in rows
        }
    return out


def to_markdown(res: dict[str, Any]) -> str:
    bf16 = res["precision"] == "bf16"
    md = [
        f"Stage timings on {res['device']} ({res['device_type']}, {res['threads']} threads), {res['precision']}"
        f"{' + channels_last' if bf16 else ''}; peak {res['peak_flops'] / 1e12:.3g} TFLOP/s ({res['peak_source']})."
        + (" QUICK MODE: tiny sizes, not a measurement." if res["quick"] else ""),
        "",
    ]

    def num(v: float | None, scale: float, f: str) -> str:
        return format(v / scale, f) if v else "—"

    md += markdown_table(
        ["stage", "what", "images/s", "GFLOP / image", "achieved TFLOP/s", "% of peak"],
        [
            (
                r["stage"],
                r["what"],
                f"{r['images_per_s']:.3f}",
                num(r["flops_per_image"], 1e9, ".1f"),
                num(r["achieved_flops"], 1e12, ".3f"),
                num(r["utilization"], 0.01, ".1f"),
            )
            for r in res["rows"]
        ],
        "llrrrr",
    )
    for ds, n in DATASETS.items():
        scale = PIXEL_SCALE[ds]
        note = "" if scale == 1 else f"; images/s estimated from the 256 px rows × {scale:.2f} (pixel ratio)"
        md += [
            "",
            (
                f"Extrapolated wall-clock, {ds} ({n:,} train images; work per stage in bench.json; perfect "
                f"scaling assumed{note}):"
            ),
            "",
        ]
        w, ex = res["workloads"][ds], res["extrapolation_s"][ds]
        md += markdown_table(
            ["stage", "images processed", *(f"{d} device{'s' * (d > 1)}" for d in DEVICES)],
            [
                (r["stage"], f"{w[r['stage']]:,.0f}", *(fmt_duration(ex[r["stage"]][str(d)]) for d in DEVICES))
                for r in res["rows"]
            ],
            "lr" + "r" * len(DEVICES),
        )
    return "\n".join(md) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/all")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs, measures nothing")
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = Setting(make_accelerator().device, bf16=args.precision == "bf16", quick=args.quick)
    peak, peak_src = peak_flops(s.device, args.precision, args.quick)
    rows = []
    for name in args.stages:
        print(f"{name} ...", flush=True)
        r = run_stage(s, name, min_time=s.min_time(args.min_time))
        r["utilization"] = r["achieved_flops"] / peak if r["achieved_flops"] else None
        rows.append(r)
        print(f"  {r['images_per_s']:.3f} img/s  ({r['what']})", flush=True)
    res = {
        **machine_info(s.device),
        "precision": args.precision,
        "peak_flops": peak,
        "peak_source": peak_src,
        "quick": args.quick,
        "rows": rows,
        "extrapolation_s": extrapolate(rows),
        "datasets": DATASETS,
        "workloads": {ds: workloads(n, ds) for ds, n in DATASETS.items()},
    }
    md = to_markdown(res)
    paths = write_report(Path(args.out), "bench", res, markdown=md)
    print(md + "wrote " + " and ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
