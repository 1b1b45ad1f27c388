"""Attack throughput, for every attack in the stage registry, and NTGA's kernel cost against its block size.

    python launch/bench/attacks.py [--out runs/bench/attacks] [--attacks lsp,tap,...] [--width 1.0] [--quick]

1. **End to end.** Every registered attack (``stages_of("attack")``, or the ``--attacks`` subset) runs once, in
   this process, as its stage does (source model, search or surrogate phases, then the map pass writing the
   poisoned set), at the stage's ``smoke`` overrides on the set they are made for (the tests' tiny synthetic set:
   16 px, 4 classes, 240 train / 80 test images; inputs given by role): wall seconds, the stage's own phase
   timings, and images/s of its final pass. A stage without smoke overrides would run at its defaults, the
   reference cost: it is listed, not run. These rows show that every attack runs and what its phases cost at
   smoke size, not the reference cost; the same in ``--quick`` and full runs.
2. **Per-batch δ at the reference settings.** For the registered attacks whose δ is a per-batch function
   (``DELTAS`` below; SEM / REM have their own benchmark, ``launch/bench/noise.py``): images/s of one
   ``make_delta`` call, i.e. the noise of one map-pass batch (for TAP and SEP the crafting pass against a
   ResNet-18 of ``--width``), at 32 px and at 224 px (AR at 32 px only: its process diverges at 224), on random
   images, at the reference settings of ``configs/<method>/cifar10.yaml``. TAP (250 steps x 8 restarts) and SEP
   (30 x (15 + 15) passes) cost the same per PGD step whatever the step count, so they are timed over ``--steps``
   steps (one restart) and scaled to the reference's count (columns ``timed passes`` / ``reference passes``).
   NTGA: one block against a 64-image target set.
3. NTGA: seconds per PGD step (kernel + prediction + gradient) for blocks of 64 … 512 at 32 px against a target set
   of ``--target`` images, fp64 and fp32.
Writes <out>/attacks.json and <out>/attacks.md. ``--quick``: tiny sizes (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from uedist.app.stages import get_stage, load_stages
from uedist.bench.fixtures import build_synthetic_set
from uedist.bench.report import markdown_table, write_report
from uedist.bench.timing import machine_info, timed, timed_once
from uedist.config import load_config
from uedist.config import run_dir as run_dir_of
from uedist.data.manifest import load_manifest
from uedist.dist import make_accelerator
from uedist.engine.attacks.ar import ARConfig, ar_delta
from uedist.engine.attacks.lsp import LSPConfig, lsp_delta
from uedist.engine.attacks.ntga import NTGAConfig, ntga_block
from uedist.engine.attacks.ops import ops_delta
from uedist.engine.attacks.sep import SEPConfig, sep_delta
from uedist.engine.attacks.tap import TAPConfig, tap_delta
from uedist.models.wrappers import Normalized
from uedist.ops.images import IMAGENET_MEAN, IMAGENET_STD
from uedist.registry import MODELS, StageDef, stages_of


# ------------------------------------------------------------------------------------------------ 1. end to end
def smoke_overrides(st: StageDef) -> tuple:
    """The stage's ``smoke`` overrides (``StageDef.smoke``; an empty tuple where the registry has no such field)."""
    return tuple(getattr(st, "smoke", ()) or ())


def smoke_set(root: Path) -> Dict[str, Path]:
    """Role -> shard set: the tiny synthetic set the smoke overrides are made for (the tests' ``synth_sets``: 16 px,
    4 classes, 240 train / 80 test images in shards of 40)."""
    train = build_synthetic_set(root, num_train=240, size=16, shard_size=40, num_test=80, num_classes=4)
    return {"train": train, "test": train.parent / "test"}


def end_to_end(names: List[str], *, root: Path) -> List[Dict[str, Any]]:
    """One row per attack: the stage run once, in this process, at its smoke overrides on :func:`smoke_set`."""
    sets, acc, rows = smoke_set(root / "data"), make_accelerator(), []
    for name in names:
        st = get_stage(name, "attack")
        smoke, missing = smoke_overrides(st), [r for r in st.roles if r not in sets]
        if not smoke or missing:
            why = f"no input for role(s) {missing}" if missing else "no smoke overrides declared"
            rows.append({"attack": name, "smoke": list(smoke), "ran": False, "why": why})
            print(f"{name:6s} end to end: {why}, not run", flush=True)
            continue
        over = [*smoke, *(f"{st.roles[r]}={sets[r]}" for r in st.roles), f"run_root={root / 'runs'}", f"name={name}"]
        cfg = load_config(st.schema, None, [*over, "progress=false", *(f"{k}={v}" for k, v in st.fixed)])
        s, wall = timed_once(lambda st=st, cfg=cfg: st(cfg, acc, run_dir_of(cfg.run_root, cfg.name)))
        timings = {k: float(v) for k, v in s.get("timings", {}).items()}
        images = int(s.get("noise", {}).get("samples", 0)) or load_manifest(sets["train"]).num_samples
        final = timings.get("final_pass_s", 0.0)
        rows.append(
            {"attack": name, "smoke": list(smoke), "ran": True, "images": images, "wall_s": wall, "timings": timings,
             "images_per_s": images / wall, "final_pass_images_per_s": images / final if final else None}
        )  # fmt: skip
        print(f"{name:6s} end to end: {images} images in {wall:.1f} s ({images / wall:.1f} img/s)", flush=True)
    return rows


# ------------------------------------------------------------------------------ 2. per-batch δ, reference settings
def _net(width: float, px: int) -> torch.nn.Module:
    import uedist.models  # noqa: F401

    stem = "cifar" if px <= 64 else "imagenet"
    net = MODELS.build("resnet18", num_classes=10, stem=stem, width=width)
    return Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval().requires_grad_(False)


def _feat_dim(net: torch.nn.Module, px: int) -> int:
    from uedist.engine.attacks.source import features_and_logits

    with torch.no_grad():
        return features_and_logits(net, torch.rand(1, 3, px, px))[0].shape[1]


def _lsp(px: int, width: float, steps: int) -> tuple:
    return lsp_delta(LSPConfig(patch_size=8 if px <= 64 else 32), num_classes=10, size=(px, px)), 0, 0


def _ar(px: int, width: float, steps: int) -> tuple:
    return ar_delta(ARConfig(), num_classes=10, size=(px, px)), 0, 0


def _ops(px: int, width: float, steps: int) -> tuple:
    return ops_delta([[{"row": k, "col": k, "colour": [1, 0, 1]}] for k in range(10)]), 0, 0


def _tap(px: int, width: float, steps: int) -> tuple:
    cfg = TAPConfig(steps=steps, restarts=1, augment="crop_flip" if px <= 64 else "rrc_flip")
    make = tap_delta(cfg, _net(width, px), num_classes=10, size=px, device=torch.device("cpu"))
    return make, steps + 1, 250 * 8 + 8


def _sep(px: int, width: float, steps: int) -> tuple:
    cfg = SEPConfig(steps=1, vr_steps=max(steps - 2, 0), num_models=2)
    nets = [_net(width, px) for _ in range(2)]
    cents = [torch.randn(10, _feat_dim(n, px)) for n in nets]
    return sep_delta(cfg, models=nets, cents=cents, num_classes=10), 2 + cfg.vr_steps, 30 * (15 + 15)


# attack -> (px, width, steps) -> (make_delta, timed passes per image, reference passes per image; 0: as it runs)
DELTAS: Dict[str, Callable[[int, float, int], tuple]] = {"lsp": _lsp, "ar": _ar, "ops": _ops, "tap": _tap, "sep": _sep}


def bench_attacks(
    names: List[str], px: int, *, batch: int, width: float, steps: int, min_time: float
) -> List[Dict[str, Any]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, px, px, generator=g), torch.randint(0, 10, (batch,), generator=g)
    keys = [f"{i:08d}" for i in range(batch)]
    for name in names:
        if name == "ntga":
            rows.append(_ntga_row(x, y, px, g, min_time=min_time))
            continue
        if name not in DELTAS or (name == "ar" and px > ARConfig().max_size):  # AR diverges at ImageNet sizes
            continue
        make, passes, ref = DELTAS[name](px, width, steps)
        rate = batch / timed(lambda make=make: make(x, y, keys), min_time)
        scaled = rate * passes / ref if ref else rate
        rows.append(
            {"attack": name, "px": px, "batch": batch, "timed_passes": passes, "reference_passes": ref,
             "timed_images_per_s": rate, "images_per_s_at_reference": scaled}
        )  # fmt: skip
        print(f"{name:5s} {px:4d}px  {rate:10.2f} img/s timed, {scaled:10.3f} img/s at the reference", flush=True)
    return rows


def _ntga_row(x: torch.Tensor, y: torch.Tensor, px: int, g: torch.Generator, *, min_time: float) -> Dict[str, Any]:
    """NTGA (CNN kernel, the reference rule: one gradient per block): one block of up to 64 of ``x`` against a
    64-image target set."""
    ntga = NTGAConfig(target_size=64, stride=2 if px <= 64 else 3)
    xt, yt = torch.rand(64, 3, px, px, generator=g), torch.randint(0, 10, (64,), generator=g)
    k, nb = ntga.make_kernel(), min(len(x), 64)
    dt = timed(lambda: ntga_block(k, x[:nb], y[:nb], target=(xt, yt), cfg=ntga, num_classes=10), min_time)
    print(f"ntga  {px:4d}px  {nb / dt:10.2f} img/s (CNN kernel, block {nb}, target 64)", flush=True)
    return {"attack": "ntga", "px": px, "batch": nb, "timed_passes": 1, "reference_passes": 1,
            "timed_images_per_s": nb / dt, "images_per_s_at_reference": nb / dt, "target": 64}  # fmt: skip


# ------------------------------------------------------------------------------------------- 3. NTGA block sweep
def bench_ntga_blocks(blocks: List[int], *, target: int, min_time: float) -> List[Dict[str, Any]]:
    """Seconds per NTGA gradient (the reference rule's one step) against the block size: 32 px, the CNN kernel,
    fp64 and fp32."""
    rows = []
    g = torch.Generator().manual_seed(1)
    xt, yt = torch.rand(target, 3, 32, 32, generator=g), torch.randint(0, 10, (target,), generator=g)
    for f64 in (True, False):
        cfg = NTGAConfig(target_size=target, float64=f64)
        for b in blocks:
            x, y = torch.rand(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)
            dt = timed(
                lambda x=x, y=y, cfg=cfg: ntga_block(cfg.make_kernel(), x, y, target=(xt, yt), cfg=cfg, num_classes=10),
                min_time,
            )
            rows.append({"block": b, "target": target, "float64": f64, "s_per_block": dt, "images_per_s": b / dt})
            print(f"ntga block {b:4d} target {target} {'fp64' if f64 else 'fp32'}: {dt:.3f} s/block", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------- report
def _end_to_end_md(res: Dict[str, Any]) -> List[str]:
    md = ["Every registered attack end to end at its smoke overrides (16 px synthetic set, 240 train / 80 test):", ""]
    md += markdown_table(
        ["attack", "smoke overrides", "wall s", "images/s", "final pass images/s", "phases (s)"],
        [(r["attack"], " ".join(r["smoke"]) + ("" if r["ran"] else f" (not run: {r['why']})"),
          f"{r['wall_s']:.1f}" if r["ran"] else "-", f"{r['images_per_s']:.1f}" if r["ran"] else "-",
          f"{r['final_pass_images_per_s']:.1f}" if r.get("final_pass_images_per_s") else "-",
          ", ".join(f"{k} {v:.1f}" for k, v in r.get("timings", {}).items()) or "-") for r in res["end_to_end"]],
        "llrrrl",
    )  # fmt: skip
    return md + [""]


def to_markdown(res: Dict[str, Any]) -> str:
    md = [f"Attacks on {res['device']} ({res['threads']} threads); TAP/SEP against ResNet-18 width {res['width']}.", ""]
    md += _end_to_end_md(res)
    md += ["Per-batch δ at the reference settings:", ""]
    md += markdown_table(
        ["attack", "px", "batch", "timed passes / image", "reference passes / image", "images/s timed",
         "images/s at the reference settings"],
        [(r["attack"], r["px"], r["batch"], r["timed_passes"] or "-", r["reference_passes"] or "-",
          f"{r['timed_images_per_s']:.2f}", f"{r['images_per_s_at_reference']:.3f}") for r in res["rows"]],
        "lrrrrrr",
    )  # fmt: skip
    others = [n for n in res["attacks"] if n not in DELTAS and n != "ntga"]
    md += [
        "",
        f"Registered attacks without a per-batch row: {', '.join(others) or 'none'} (SEM / REM: bench/noise.py).",
        "",
        "The ntga rows above time one block against a target set of 64 images (the reference: 10,000; see below).",
        "",
        f"NTGA (CNN kernel, the reference rule: one gradient per block) against the block size, 32 px, "
        f"target {res['target']}:",
        "",
    ]
    md += markdown_table(
        ["block", "precision", "s / block", "images/s"],
        [(r["block"], "fp64" if r["float64"] else "fp32", f"{r['s_per_block']:.3f}", f"{r['images_per_s']:.1f}")
         for r in res["ntga_blocks"]],
        "rlrr",
    )  # fmt: skip
    return "\n".join(md) + "\n"


def parse_args(argv: Any) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/attacks")
    p.add_argument("--attacks", default="", help="comma-separated subset of the registered attacks (default: all)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=3, help="PGD steps timed for TAP / SEP (scaled to the reference)")
    p.add_argument("--target", type=int, default=2000, help="NTGA target set size for the block sweep")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    load_stages()
    known = stages_of("attack")
    a.attacks = [s for s in a.attacks.split(",") if s] or known
    bad = [s for s in a.attacks if s not in known]
    if bad:
        p.error(f"unknown attack(s) {bad}; registered: {known}")
    return a


def main(argv: Any = None) -> None:
    a = parse_args(argv)
    quick, min_time = a.quick, 0 if a.quick else 2
    res: Dict[str, Any] = {**machine_info(torch.device("cpu")), "width": 0.125 if quick else a.width}
    res.update(quick=quick, attacks=a.attacks)
    with tempfile.TemporaryDirectory(prefix="uedist_bench_attacks_") as tmp:
        res["end_to_end"] = end_to_end(a.attacks, root=Path(tmp))
    rows = []
    for px, batch in ((32, 8 if quick else 64), (224, 2 if quick else 8)):
        rows += bench_attacks(
            a.attacks, px, batch=batch, width=res["width"], steps=1 if quick else a.steps, min_time=min_time
        )
    res["rows"] = rows
    res["target"] = 64 if quick else a.target
    blocks = [16, 32] if quick else [64, 128, 256, 512]
    res["ntga_blocks"] = (
        bench_ntga_blocks(blocks, target=res["target"], min_time=min_time) if "ntga" in a.attacks else []
    )
    js, md = write_report(Path(a.out), "attacks", res, markdown=to_markdown(res))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
