"""ImageNet-scale timing: every stage at its real resolution and model size, FLOPs, and wall-clock extrapolations.

    python launch/bench.py [--out runs/bench/all] [--stages sem_step,rem_step,...] [--quick]

For each stage: images/s on this device (one process) at the real settings (ImageNet-100: 256 px stored, 224 px
crops, full-width ResNet-18, the 256 px UNet, the ImageNet-100 D-VAE), the FLOPs per image counted with
``torch.utils.flop_counter`` (matmul/conv, forward and backward, as executed), the achieved FLOP/s against the
device's peak (the datasheet figure for known GPUs; on CPUs a measured large-GEMM rate, stated as such), and the
stage's wall-clock for ImageNet-100 (≈130k train images) and Facescrub on 1, 8 and 64 devices.

Extrapolation model (stated, not measured): work = images the stage processes at the reference settings (table
``WORKLOADS`` below, from the configs); time = work / (images/s per device × devices), i.e. perfect data-parallel
scaling. Real multi-device runs lose some of that to communication and input pipelines, so read the 8- and
64-device columns as lower bounds. The loader row is per loader *process* (decode + crop on the host CPU).

Writes <out>/bench.json and <out>/bench.md. ``--quick`` shrinks everything (a smoke test, not a measurement).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from uedist.config import load_config
from uedist.dist import make_accelerator
from uedist.benchmark import timed
from uedist.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]

# Datasheet dense peaks (FLOP/s) for the accelerators we expect; CPUs get a measured GEMM rate instead.
PEAKS = {"H200": {"bf16": 989e12, "fp32": 67e12}, "H100": {"bf16": 989e12, "fp32": 67e12},
         "A100": {"bf16": 312e12, "fp32": 19.5e12}, "L40S": {"bf16": 362e12, "fp32": 91.6e12}}

# Train-set sizes and per-stage work (images processed) at the reference settings of the configs.
DATASETS = {"imagenet100": 130_000, "facescrub": 85_000}  # Facescrub: ≈106k images of 530 people, 80% train
# Facescrub is stored at 112 px: its per-image cost is taken as the measured 256 px one times the pixel ratio
# (convolution cost is linear in pixels), an estimate, not a measurement; the loader is not rescaled.
PIXEL_SCALE = {"imagenet100": 1.0, "facescrub": (256 / 112) ** 2}
DEVICES = (1, 8, 64)


def workloads(n: int, ds: str) -> Dict[str, float]:
    """Images processed by each stage for a train set of ``n`` images (see the configs named)."""
    sem = load_config(_noise_cfg(), REPO / f"configs/sem/{ds}.yaml")
    victim_epochs = load_config(_victim_cfg(), REPO / f"configs/victim/{ds}.yaml").epochs
    dvae = _dvae_epochs(ds)
    from uedist.engine.ddpm import DDPMConfig

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


def _noise_cfg():
    from uedist.engine.noise import NoiseConfig

    return NoiseConfig


def _victim_cfg():
    from uedist.engine.victim import VictimConfig

    return VictimConfig


def _dvae_epochs(ds: str) -> float:
    from uedist.engine.dvae import DVAEConfig

    return load_config(DVAEConfig, REPO / f"configs/dvae/{ds}.yaml").epochs


# ------------------------------------------------------------------------------------------------------ measuring
def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call, from torch's per-op formulas (conv, matmul, attention; forward and backward as run).
    A plain dispatch mode: FlopCounterMode's module hooks break ``torch.autograd.grad`` on leaf inputs, which the
    noise steps use."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            f = flop_registry.get(func._overloadpacket)
            if f is not None:
                Count.total += f(*args, **kwargs, out_val=out)
            return out

    with Count():
        fn()
    return float(Count.total)


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    dt = timed(lambda: a @ b, 1.0, 50)
    return 2 * n**3 / dt


# --------------------------------------------------------------------------------------------------------- stages
class Bench:
    def __init__(self, device: torch.device, bf16: bool, quick: bool) -> None:
        self.device, self.bf16, self.quick = device, bf16, quick
        self.amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
        self.px, self.crop = (64, 56) if quick else (256, 224)

    def batch(self, gpu: int, cpu: int) -> int:
        return 1 if self.quick else (gpu if self.device.type == "cuda" else cpu)

    def _cl(self, m: torch.nn.Module) -> torch.nn.Module:
        m = m.to(self.device)
        return m.to(memory_format=torch.channels_last) if self.bf16 else m

    def loader(self) -> Tuple[Callable[[], Any], int, str]:
        from uedist.data.build import BuildConfig, build_shard_sets
        from uedist.data.loaders import make_train_loader
        from uedist.ops.augment import random_resized_crop_flip

        tmp = Path(tempfile.mkdtemp(prefix="uedist_bench_"))
        n = 64 if self.quick else 512
        build_shard_sets(load_config(BuildConfig, None, [f"out={tmp}", "workers=0", "splits=[train]", "shard_size=128",
                                                         f"synthetic.num_train={n}", f"synthetic.size={self.px}",
                                                         "encoding=jpg"]), progress=False)
        gen = torch.Generator().manual_seed(0)

        def run() -> None:
            for b in make_train_loader(tmp / "train", batch_size=32, num_steps=n // 32, rank=0, world_size=1,
                                       num_workers=0):
                random_resized_crop_flip(b["image"].float().div(255), self.crop, gen=gen)

        return run, n, f"{n} JPEG {self.px} px, decode + RRC {self.crop} + flip, 1 process"

    def _noise(self, method: str) -> Tuple[Any, ...]:
        from uedist.data.manifest import Manifest
        from uedist.engine.noise import NoiseConfig, make_eot, surrogate_for

        over = [f"method={method}", "surrogate.width=1.0", "surrogate.stem=cifar", "noise_steps=7", "noise_step_size=2",
                "eot_samples=4", "adv_steps=7", "adv_step_size=1", "augment=rrc_flip", f"train_size={self.crop}",
                f"bf16={str(self.bf16).lower()}", f"channels_last={str(self.bf16).lower()}"]
        if self.quick:
            over += ["noise_steps=1", "eot_samples=1", "adv_steps=1", "surrogate.width=0.125"]
        cfg = load_config(NoiseConfig, None, over)
        m = Manifest("bench", "train", [str(i) for i in range(100)], (self.px, self.px), "png", [])
        model = self._cl(surrogate_for(cfg, m))
        gen = torch.Generator().manual_seed(0)
        b = self.batch(32, 1)
        x = torch.rand(b, 3, self.px, self.px, device=self.device)
        y = torch.randint(0, 100, (b,), device=self.device)
        return cfg, model, make_eot(cfg, m, gen), gen, x, y, b

    def noise_step(self, method: str) -> Tuple[Callable[[], Any], int, str]:
        from uedist.engine.noise import _surrogate_step, noise_for_batch

        cfg, model, eot, gen, x, y, b = self._noise(method)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        acc = make_accelerator()

        def run() -> None:
            d = noise_for_batch(cfg, model, x, y, eot, gen, self.amp)
            _surrogate_step(cfg, model, model, opt, x + d, y, eot, gen, self.amp, acc, 1, Path(tempfile.gettempdir()))

        inner = cfg.adv_steps + 1 if method == "rem" else 1
        passes = cfg.noise_steps * cfg.eot_samples * inner + cfg.adv_steps + 1
        return run, b, f"ResNet-18 w{cfg.surrogate.width:g}, K_u {cfg.noise_steps}, J {cfg.eot_samples}, K_a {cfg.adv_steps}: {passes} fwd+bwd/img"

    def final_pass(self) -> Tuple[Callable[[], Any], int, str]:
        from uedist.engine.noise import noise_for_batch

        cfg, model, eot, gen, x, y, b = self._noise("sem")
        return (lambda: noise_for_batch(cfg, model, x, y, eot, gen, self.amp)), b, \
            f"SEM δ only: {cfg.noise_steps * cfg.eot_samples} fwd+bwd/img"

    def victim_train(self) -> Tuple[Callable[[], Any], int, str]:
        from uedist.models.resnet import resnet18

        model = self._cl(resnet18(num_classes=100, width=0.125 if self.quick else 1.0, stem="imagenet"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        b = self.batch(256, 4)
        x = torch.rand(b, 3, self.crop, self.crop, device=self.device)
        y = torch.randint(0, 100, (b,), device=self.device)

        def run() -> None:
            with torch.autocast(**self.amp):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run, b, f"ResNet-18 (ImageNet stem) at {self.crop} px, one SGD step"

    def _dvae(self):
        from uedist.data.manifest import Manifest
        from uedist.engine.dvae import DVAEConfig, build_dvae

        cfg = load_config(DVAEConfig, REPO / "configs/dvae/imagenet100.yaml",
                          ["model.width=0.125"] if self.quick else [])
        m = Manifest("bench", "train", [str(i) for i in range(100)], (self.px, self.px), "png", [])
        return cfg, self._cl(build_dvae(cfg, m))

    def dvae_train(self) -> Tuple[Callable[[], Any], int, str]:
        from uedist.models.dvae import dvae_loss

        cfg, model = self._dvae()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        b = self.batch(64, 2)
        x = torch.rand(b, 3, self.px, self.px, device=self.device)
        y = torch.randint(0, 100, (b,), device=self.device)

        def run() -> None:
            with torch.autocast(**self.amp):
                loss, _ = dvae_loss(model(x, y), x, kld_limit=1.0, kld_weight=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run, b, f"D-VAE (configs/dvae/imagenet100.yaml) at {self.px} px, one Adam step"

    def dvae_infer(self) -> Tuple[Callable[[], Any], int, str]:
        _, model = self._dvae()
        model.eval()
        b = self.batch(128, 4)
        x = torch.rand(b, 3, self.px, self.px, device=self.device)
        y = torch.randint(0, 100, (b,), device=self.device)

        def run() -> None:
            with torch.no_grad(), torch.autocast(**self.amp):
                model(x, y)

        return run, b, f"D-VAE forward at {self.px} px"

    def _unet(self):
        from uedist.models.unet import UNETS

        kw = {"ch": 16, "ch_mult": (1, 2), "image_size": self.px, "attn_resolutions": ()} if self.quick else {}
        return self._cl(UNETS.build("ddpm_256", **kw))

    def ddpm_train(self) -> Tuple[Callable[[], Any], int, str]:
        net = self._unet()
        opt = torch.optim.Adam(net.parameters(), lr=2e-5)
        b = self.batch(16, 1)
        x = torch.rand(b, 3, self.px, self.px, device=self.device) * 2 - 1
        t = torch.randint(0, 1000, (b,), device=self.device)

        def run() -> None:
            noise = torch.randn_like(x)
            with torch.autocast(**self.amp):
                loss = F.mse_loss(net(x + noise, t).float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run, b, f"UNet ddpm_256 at {self.px} px, one Adam step"

    def jcdp_purify(self) -> Tuple[Callable[[], Any], int, str]:
        from uedist.diffusion.purify import jcdp_guidance, purify
        from uedist.diffusion.schedule import Schedule
        from uedist.models.lpips import LPIPS

        net = self._unet().eval()
        lp = LPIPS("alex").to(self.device).eval()  # random trunk: the cost is the same as the pretrained one's
        for p in (*net.parameters(), *lp.parameters()):
            p.requires_grad_(False)
        s = Schedule.linear(1000)
        # One measured call = one MSE-guided step (t = 2) + one LPIPS-guided step (t = 1). The reference round
        # (T_p = 20: MSE for t > 10, LPIPS for t <= 10) is 10 of each, N = 4 rounds: 40 such pairs per image.
        pairs = 1 if self.quick else 40
        guide = jcdp_guidance(lambda a, b: lp(a, b), lam_mse=100.0, lam_lpips=1000.0, mse_t=(2, 1000),
                              lpips_t=(1, 1))
        b = self.batch(16, 1)
        x = torch.rand(b, 3, self.px, self.px, device=self.device) * 2 - 1

        def eps(z: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            with torch.autocast(**self.amp):
                return net(z, tt).float()

        def run() -> None:
            purify(eps, s, x, t_p=2, rounds=1, gen=torch.Generator().manual_seed(0), guide=guide)

        return run, b, (f"JCDP N 4 × T_p 20 (10 MSE- + 10 LPIPS(alex)-guided steps per round) with UNet ddpm_256 at "
                        f"{self.px} px; measured 1 + 1 steps, × {pairs}"), pairs


STAGES = ["loader", "sem_step", "rem_step", "final_pass", "victim_train", "dvae_train", "dvae_infer", "ddpm_train",
          "jcdp_purify"]


def run_stage(bench: Bench, name: str, min_time: float, max_iters: int) -> Dict[str, Any]:
    special = {"sem_step": lambda: bench.noise_step("sem"), "rem_step": lambda: bench.noise_step("rem")}
    make = special[name] if name in special else getattr(bench, name)
    made = make()
    fn, per_call, what = made[:3]
    factor = made[3] if len(made) > 3 else 1  # the measured call is 1/factor of the stage's per-image work
    flops = 0.0 if name == "loader" else count_flops(fn) * factor  # also the warm-up call
    dt = timed(fn, min_time, max_iters) * factor
    return {"stage": name, "what": what, "images_per_call": per_call, "s_per_call": dt, "images_per_s": per_call / dt,
            "flops_per_image": flops / per_call if flops else None,
            "achieved_flops": flops / dt if flops else None}


def _fmt_time(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/all")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs, measures nothing")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    acc = make_accelerator()
    dev = acc.device
    bf16 = args.precision == "bf16"
    name = torch.cuda.get_device_name() if dev.type == "cuda" else (platform.processor() or platform.machine())
    peak_src, peak = "measured GEMM", None
    for k, v in PEAKS.items():
        if dev.type == "cuda" and k in name:
            peak, peak_src = v[args.precision], f"datasheet {k} dense {args.precision}"
    if peak is None:  # the GEMM in the stages' own precision (CPUs with AMX run bf16 several times faster)
        n = 256 if args.quick else (8192 if dev.type == "cuda" else 2048)
        peak = gemm_rate(dev, torch.bfloat16 if bf16 else torch.float32, n)
        peak_src = f"measured {args.precision} GEMM {n}², {torch.get_num_threads()} threads"
    bench = Bench(dev, bf16, args.quick)
    rows = []
    for s in stages:
        print(f"{s} ...", flush=True)
        r = run_stage(bench, s, 0.0 if args.quick else args.min_time, 1 if args.quick else 10)
        r["utilization"] = r["achieved_flops"] / peak if r["achieved_flops"] else None
        rows.append(r)
        print(f"  {r['images_per_s']:.3f} img/s  ({r['what']})", flush=True)
    extrap = {}
    for ds, n in DATASETS.items():
        w = workloads(n, ds)
        extrap[ds] = {r["stage"]: {str(d): w[r["stage"]] / (r["images_per_s"] * d *
                                                          (1.0 if r["stage"] == "loader" else PIXEL_SCALE[ds]))
                                   for d in DEVICES} for r in rows}
    res = {"device": name, "device_type": dev.type, "threads": torch.get_num_threads(), "precision": args.precision,
           "peak_flops": peak, "peak_source": peak_src, "quick": args.quick, "rows": rows, "extrapolation_s": extrap,
           "datasets": DATASETS, "workloads": {ds: workloads(n, ds) for ds, n in DATASETS.items()}}
    out = Path(args.out)
    atomic_write_json(out / "bench.json", res)
    md = [f"Stage timings on {name} ({dev.type}, {torch.get_num_threads()} threads), {args.precision}"
          f"{' + channels_last' if bf16 else ''}; peak {peak / 1e12:.3g} TFLOP/s ({peak_src})."
          + (" QUICK MODE: tiny sizes, not a measurement." if args.quick else ""), "",
          "| stage | what | images/s | GFLOP / image | achieved TFLOP/s | % of peak |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        fl = f"{r['flops_per_image'] / 1e9:.1f}" if r["flops_per_image"] else "—"
        af = f"{r['achieved_flops'] / 1e12:.3f}" if r["achieved_flops"] else "—"
        ut = f"{100 * r['utilization']:.1f}" if r["utilization"] else "—"
        md.append(f"| {r['stage']} | {r['what']} | {r['images_per_s']:.3f} | {fl} | {af} | {ut} |")
    for ds, n in DATASETS.items():
        note = "" if PIXEL_SCALE[ds] == 1 else f"; images/s estimated from the 256 px rows × {PIXEL_SCALE[ds]:.2f} (pixel ratio)"
        md += ["", f"Extrapolated wall-clock, {ds} ({n:,} train images; work per stage in bench.json; perfect "
               f"scaling assumed{note}):", "", "| stage | images processed | " + " | ".join(f"{d} device{'s' * (d > 1)}"
                                                                         for d in DEVICES) + " |",
               "|---|---:|" + "---:|" * len(DEVICES)]
        w = workloads(n, ds)
        md += [f"| {s} | {w[s]:,.0f} | " + " | ".join(_fmt_time(extrap[ds][s][str(d)]) for d in DEVICES) + " |"
               for s in (r["stage"] for r in rows)]
    atomic_write_text(out / "bench.md", "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
