"""Noise generation speed: our SEM / REM step beside the reference code's structure, its profile, and memory.

    python launch/bench/noise.py [--out runs/bench/noise] [--width 1.0] [--quick]

1. **Side by side.** One surrogate step (a fresh δ for the batch + one adversarially trained SGD step) of SEM and
   REM at 32 px (CIFAR reference settings: K_u 10, J 5, K_a 10; batch 32 and 128) and at 256 px stored / RRC 224
   (ImageNet-100 settings: K_u 7, J 4, K_a 7, CIFAR stem as the reference keeps it), each three ways: the
   reference's structure (J separate forwards of B images per δ step, fp32: ``uedist.bench.reference.
   reference_noise_delta``), ours at fp32, and ours at the defaults (bf16 + channels_last where native, the
   inner-loop chunk of ``uedist.ops.batching``). Forward/backward passes per image are counted as the rows whose
   loss is taken; the ratio is the reference structure's time over ours; GFLOP/s is the step's convolution and
   matmul FLOPs (counted once) over its time, beside the device's measured GEMM peak at that precision.
   Where ``--k-rem`` / ``--k-224`` cut K_u (to keep the run short) the row says so: every structure then runs the
   same cut step, so the ratio is unchanged.
2. The chunk sweep behind the CPU default: forward + input-backward images/s against images per forward.
3. ``torch.compile`` of the surrogate's forward: cold (first step, compile included) and steady-state time.
4. A torch.profiler profile of one SEM step at the defaults: the share of time in convolution / GEMM kernels.
5. Peak RSS of the final pass over N and 4N samples (subprocesses): it must not grow with the dataset.
Writes <out>/noise.json and <out>/noise.md. ``--quick``: width 1/8, tiny steps and batches (a smoke run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from uedist.bench.fixtures import fake_manifest
from uedist.bench.report import markdown_table, write_report
from uedist.bench.steps import noise_steps
from uedist.bench.timing import count_flops, gemm_rate, machine_info, timed
from uedist.config import load_config
from uedist.dist import make_accelerator
from uedist.engine.attacks.sem_rem import SEMConfig
from uedist.engine.attacks.surrogate import eot_size, surrogate_for
from uedist.precision import resolved

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
QUICK = ["noise_steps=1", "eot_samples=2", "adv_steps=1"]
FP32 = ["bf16=false", "channels_last=false"]
WAYS = [("reference", "fp32", FP32), ("ours", "fp32", FP32), ("ours", "defaults", [])]


def config(method: str, px: int, *, width: float, quick: bool, extra: list[str]) -> SEMConfig:
    over = [f"method={method}", f"surrogate.width={width}", "surrogate.stem=cifar", *SETTINGS[px]]
    return load_config(SEMConfig, None, over + (QUICK if quick else []) + extra)


def step_flops(cfg: SEMConfig, px: int, passes: int, batch: int, accelerator: Any) -> float:
    """Convolution + matmul FLOPs of a step: one image's forward + input-backward at the augmented size, × passes ×
    batch (the SGD step's weight gradients are left out: a lower bound)."""
    model = surrogate_for(cfg, fake_manifest(px, 10)).to(accelerator.device).eval()
    model.requires_grad_(False)
    h, w = eot_size(cfg, (px, px))
    x = torch.rand(1, 3, h, w, device=accelerator.device)

    def one() -> None:
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xi).logsumexp(1).sum(), xi)

    return count_flops(one) * passes * batch


def side_by_side(args: argparse.Namespace, acc: Any, width: float, peak: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    batches = {32: args.batches_32, 256: [args.batch_256]}
    for px in (32, 256):
        for method in ("sem", "rem"):
            k = args.k_224 if px == 256 else (args.k_rem if method == "rem" else 0)
            cut = [f"noise_steps={k}"] if k and not args.quick else []
            for batch in batches[px]:
                base = None
                for structure, precision, over in WAYS:
                    cfg = config(method, px, width=width, quick=args.quick, extra=over + cut)
                    m = fake_manifest(px, 10)
                    fn, _ = noise_steps(cfg, m, batch=batch, accelerator=acc, structure=structure)["surrogate step"]
                    n, remove = count_loss_rows()
                    dt = timed(fn, 0.0 if args.quick else args.min_time)
                    calls = max(1, round(n[0] / batch / _passes_formula(cfg)))  # timed() may call fn several times
                    remove()
                    passes = n[0] / batch / calls
                    prec = resolved(cfg, acc.device)
                    flops = step_flops(cfg, px, round(passes), batch, acc)
                    row = {
                        "method": method,
                        "px": px,
                        "batch": batch,
                        "noise_steps": cfg.noise_steps,
                        "eot_samples": cfg.eot_samples,
                        "adv_steps": cfg.adv_steps,
                        "structure": structure,
                        "precision": "bf16+cl" if prec["bf16"] else ("fp32+cl" if prec["channels_last"] else "fp32"),
                        "fwd_bwd_per_image": passes,
                        "s_per_step": dt,
                        "images_per_s": batch / dt,
                        "gflops_per_s": flops / dt / 1e9,
                    }
                    row["peak_fraction"] = row["gflops_per_s"] * 1e9 / peak["bf16" if prec["bf16"] else "fp32"]
                    base = base or dt
                    row["speedup_vs_reference"] = base / dt
                    rows.append(row)
                    print(
                        f"{method} {px}px b{batch} {structure:9s} {row['precision']:7s} {dt:8.2f} s/step "
                        f"({passes:.0f} passes/img) ×{row['speedup_vs_reference']:.2f}",
                        flush=True,
                    )
    return rows


def _passes_formula(cfg: SEMConfig) -> int:
    inner = cfg.adv_steps + 1 if cfg.method == "rem" else 1
    return cfg.noise_steps * cfg.eot_samples * inner + cfg.adv_steps + 1


def compile_rows(args: argparse.Namespace, acc: Any, width: float) -> list[dict[str, Any]]:
    """SEM at 32 px, the defaults, eager vs ``compile=true``: first-call (cold) and steady-state s/step."""
    import time

    out = []
    batch = args.batches_32[0]
    for comp in (False, True):
        cfg = config("sem", 32, width=width, quick=args.quick, extra=[f"compile={str(comp).lower()}"])
        fn, _ = noise_steps(cfg, fake_manifest(32, 10), batch=batch, accelerator=acc)["surrogate step"]
        t0 = time.perf_counter()
        fn()
        cold = time.perf_counter() - t0
        steady = timed(fn, 0.0 if args.quick else args.min_time)
        out.append({"compile": comp, "batch": batch, "cold_s": cold, "steady_s_per_step": steady})
        print(f"compile={comp}: cold {cold:.1f} s, steady {steady:.2f} s/step", flush=True)
    return out


def chunk_sweep(args: argparse.Namespace, acc: Any, width: float) -> list[dict[str, Any]]:
    """Images/s of the inner loop's unit (surrogate forward + input backward, eval mode, frozen) against images
    per forward, fp32 and bf16 + channels_last, at 32 and 224 px: the measurement behind
    ``uedist.ops.batching.CPU_PIXELS`` (and on a GPU, why the default is one forward)."""
    from uedist.engine.inner import forward_fn
    from uedist.ops.batching import input_grad
    from uedist.precision import amp_args

    sizes = {32: [2] if args.quick else [8, 16, 32, 64, 128, 256, 640], 224: [1] if args.quick else [2, 4, 8, 16]}
    out = []
    for px, batches in sizes.items():
        for bf16 in (False, True):
            cfg = config("sem", 32, width=width, quick=args.quick, extra=[f"bf16={str(bf16).lower()}"])
            model = surrogate_for(cfg, fake_manifest(px, 10)).to(acc.device).eval()
            model.requires_grad_(False)
            if bf16:
                model = model.to(memory_format=torch.channels_last)
            fwd = forward_fn(cfg, model, amp_args(bf16, acc.device))
            for b in batches:
                x = torch.rand(b, 3, px, px, device=acc.device)
                x = x.contiguous(memory_format=torch.channels_last) if bf16 else x
                y = torch.zeros(b, dtype=torch.long, device=acc.device)
                dt = timed(lambda: input_grad(fwd, x, y), 0.0 if args.quick else args.min_time)
                out.append({"px": px, "precision": "bf16+cl" if bf16 else "fp32", "images": b, "images_per_s": b / dt})
                print(f"chunk sweep {px}px {out[-1]['precision']} {b:4d} images: {b / dt:8.1f} img/s", flush=True)
    return out


def profile(args: argparse.Namespace, acc: Any, width: float) -> dict[str, Any]:
    """Self time of one SEM step at the defaults by operator: conv / GEMM kernels vs the rest."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    cfg = config("sem", 32, width=width, quick=args.quick, extra=[])
    fn, _ = noise_steps(cfg, fake_manifest(32, 10), batch=args.batches_32[0], accelerator=acc)["surrogate step"]
    fn()  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if acc.device.type == "cuda" else [])
    with prof(activities=acts) as p:
        fn()
    cuda = acc.device.type == "cuda"
    ops = []
    for e in p.key_averages():
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        ops.append((e.key, float(t)))
    total = sum(t for _, t in ops) or 1.0
    compute = sum(t for k, t in ops if _is_compute(k))
    top = sorted(ops, key=lambda kv: -kv[1])[:12]
    return {
        "batch": args.batches_32[0],
        "clock": "device" if cuda else "cpu",
        "total_ms": total / 1e3,
        "conv_gemm_share": compute / total,
        "top": [{"op": k, "ms": t / 1e3, "share": t / total, "conv_gemm": _is_compute(k)} for k, t in top],
    }


def _is_compute(name: str) -> bool:
    n = name.lower()
    return any(s in n for s in ("conv", "mm", "matmul", "linear", "gemm", "mkldnn_rnn"))


def count_loss_rows() -> tuple[list[int], Callable[[], None]]:
    """([n], remove): n counts the images whose loss is taken (``F.cross_entropy``'s rows) from now until
    ``remove()``: every forward of the noise loops, the PGD and the training step ends in one, whichever module
    (the surrogate or a BatchNorm-folded copy of it) ran the forward."""
    n = [0]
    orig = F.cross_entropy

    def counting(logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        n[0] += int(logits.shape[0])
        return orig(logits, *args, **kwargs)

    torch.nn.functional.cross_entropy = counting

    def remove() -> None:
        torch.nn.functional.cross_entropy = orig

    return n, remove


def peak_rss(n: int, tmp: Path) -> float:
    """Peak RSS (MiB) of a subprocess that builds N synthetic samples and writes their random-noise poisoned set."""
    # VmHWM (this process's own high-water mark, kB): ru_maxrss would carry the parent's peak across exec
    code = f"""
from pathlib import Path
from uedist.bench.fixtures import build_synthetic_set
from uedist.config import load_config
from uedist.dist import make_accelerator
from uedist.engine.attacks.base import write_poisoned
from uedist.engine.attacks.random_noise import RandomConfig, random_delta
from uedist.ops.budget import Budget
train = build_synthetic_set(Path("{tmp}/d{n}"), num_train={n}, size=64, shard_size=500)
cfg = load_config(RandomConfig, None, [f"data.train={{train}}", "method=random", "out={tmp}/p{n}", "progress=false",
    "data.workers=0"])
write_poisoned(cfg, make_accelerator(), Path("{tmp}"), make_delta=random_delta(cfg), stage="bench",
    budget=Budget("linf", cfg.budget))
print([ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[-1]) / 1024


def to_markdown(res: dict[str, Any], width: float) -> str:
    pk = res["peak_gflops"]
    md = [
        f"Noise generation on {res['device']} ({res['threads']} threads), surrogate ResNet-18 width {width}; "
        f"measured GEMM peak {pk['fp32']:.0f} GFLOP/s fp32, {pk['bf16']:.0f} GFLOP/s bf16.",
        "",
    ]
    md += markdown_table(
        [
            "method",
            "px",
            "batch",
            "K_u·J·K_a",
            "structure",
            "precision",
            "fwd+bwd / img",
            "s / step",
            "img/s",
            "× reference",
            "GFLOP/s",
            "% of peak",
        ],
        [
            (
                r["method"].upper(),
                r["px"],
                r["batch"],
                f"{r['noise_steps']}·{r['eot_samples']}·{r['adv_steps']}",
                r["structure"],
                r["precision"],
                f"{r['fwd_bwd_per_image']:.0f}",
                f"{r['s_per_step']:.2f}",
                f"{r['images_per_s']:.2f}",
                f"{r['speedup_vs_reference']:.2f}",
                f"{r['gflops_per_s']:.0f}",
                f"{100 * r['peak_fraction']:.0f}",
            )
            for r in res["rows"]
        ],
        "lrrllrrrrrrr",
    )
    md += ["", "Inner-loop unit (forward + input backward, frozen surrogate) against images per forward, img/s:", ""]
    sw = res["chunk_sweep"]
    keys = sorted({(r["px"], r["precision"]) for r in sw})
    for px, prec in keys:
        cells = [f"{r['images']}: {r['images_per_s']:.1f}" for r in sw if (r["px"], r["precision"]) == (px, prec)]
        md.append(f"- {px} px {prec}: " + ", ".join(cells))
    md += ["", "torch.compile of the surrogate (SEM, 32 px, the defaults):", ""]
    md += markdown_table(
        ["compile", "batch", "first step (cold) s", "steady s / step"],
        [
            (str(c["compile"]).lower(), c["batch"], f"{c['cold_s']:.1f}", f"{c['steady_s_per_step']:.2f}")
            for c in res["compile"]
        ],
        "lrrr",
    )
    pr = res["profile"]
    md += [
        "",
        f"Profile of one SEM step at the defaults (32 px, batch {pr['batch']}, {pr['clock']} self time "
        f"{pr['total_ms']:.0f} ms): {100 * pr['conv_gemm_share']:.0f} % in convolution / GEMM kernels.",
        "",
    ]
    md += markdown_table(
        ["op", "ms", "share", "conv/GEMM"],
        [(t["op"], f"{t['ms']:.1f}", f"{100 * t['share']:.1f} %", "yes" if t["conv_gemm"] else "") for t in pr["top"]],
        "lrrl",
    )
    rss = res["memory"]
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
    p.add_argument(
        "--batches-32",
        type=lambda s: [int(v) for v in s.split(",")],
        default=None,
        help="batches at 32 px (default 32,128; quick 2)",
    )
    p.add_argument("--batch-256", type=int, default=None, help="batch at 256 px (default 2; quick 1)")
    p.add_argument("--k-rem", type=int, default=2, help="K_u of the 32 px REM rows (0 = the reference's 10)")
    p.add_argument("--k-224", type=int, default=1, help="K_u of the 256 px rows (0 = the reference's 7)")
    p.add_argument("--rss-n", type=int, default=2000, help="N for the peak-RSS comparison (N vs 4N, 64 px)")
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    args.batches_32 = args.batches_32 or ([2] if args.quick else [32, 128])
    args.batch_256 = args.batch_256 or (1 if args.quick else 2)
    acc = make_accelerator()
    width = args.width if args.width is not None else (0.125 if args.quick else 1.0)
    n = 256 if args.quick else 2048
    peak = {"fp32": gemm_rate(acc.device, torch.float32, n), "bf16": gemm_rate(acc.device, torch.bfloat16, n)}
    sweep = chunk_sweep(args, acc, width)
    rows = side_by_side(args, acc, width, peak)
    comp = compile_rows(args, acc, width)
    pr = profile(args, acc, width)
    with tempfile.TemporaryDirectory() as tmp:
        k = 200 if args.quick else args.rss_n
        rss = {"N": k, "rss_N_mib": peak_rss(k, Path(tmp)), "rss_4N_mib": peak_rss(4 * k, Path(tmp))}
    res = {
        **machine_info(acc.device),
        "quick": args.quick,
        "width": width,
        "peak_gflops": {k2: v / 1e9 for k2, v in peak.items()},
        "rows": rows,
        "chunk_sweep": sweep,
        "compile": comp,
        "profile": pr,
        "memory": rss,
    }
    md = to_markdown(res, width)
    paths = write_report(Path(args.out), "noise", res, markdown=md)
    print(md + "wrote " + " and ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
