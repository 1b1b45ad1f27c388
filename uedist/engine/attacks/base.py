"""What every attack shares: the job fields, the poisoned-set writer, key selection, noise statistics and the
end-of-job summary. One module per method sits beside this one (``sem_rem``, ``em``, ``random_noise``, ``tap``,
``sep``, ``ntga``, ``lsp``, ``ar``, ``ops``); docs/architecture.md says how to add one.

Each attack is a stage ``fn(cfg, accelerator, run_dir)`` whose config extends :class:`AttackConfig` and whose
last step is :func:`finish_attack` (or :func:`write_poisoned` directly): the shard map pass that writes
``clip(x + δ)`` for every sample (or the ``poison_ratio`` subset), applies the attack's budget (ℓ∞ / ℓ2 / ℓ0,
:mod:`uedist.ops.budget`) and checks it on every written sample (a violation stops the job), resumes by shard,
draws ``grid.png`` (clean | poisoned | noise); the stage writes ``metrics.json``. δ for a batch must depend only
on the batch's samples and keys (seed generators with :func:`batch_gen` / :func:`key_gen`), so a resumed pass
writes the bytes an uninterrupted one does and two processes write what one does. Nothing holds all the noise in
memory: each batch's noise lives only until its shard is written.
"""

from __future__ import annotations

import hashlib
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

from uedist.config import ConfigError, Precision, Resumable, Seeded, identity, location, positive, require, runtime
from uedist.data.loaders import make_map_loader
from uedist.data.manifest import Manifest, keys_of, load_manifest
from uedist.dist import get_logger
from uedist.engine.map_pass import npy_bytes, pass_seconds, run_map_pass
from uedist.engine.purifiers.common import comparison_grid, noise_view, read_one_per_class
from uedist.engine.stats import RunningSums
from uedist.io import atomic_write_json
from uedist.ops.budget import Budget, measure
from uedist.ops.images import to_unit

log = get_logger(__name__)


@dataclass
class AttackData:
    """The ``data`` section of every attack: the clean set it protects and how the training loops read it."""

    train: str = "shards/synthetic/train"  # the clean set to protect
    test: str = ""  # optional clean test set: the surrogate's clean accuracy is reported
    build: str = ""  # shard-build YAML used to create `train` when it does not exist (the main job's synthetic set)
    batch_size: int = positive(128)  # global, split across ranks
    workers: int = runtime(2)
    shuffle_buffer: int = 2000


@dataclass
class AttackConfig(Precision, Resumable, Seeded):
    """The fields every attack has (on the run fields of :class:`uedist.config.JobConfig`: name, run_root,
    progress, seed, resume, bf16, channels_last); each attack's config adds its own settings. An ℓ∞ limit is called
    ``budget`` (/255) in every attack."""

    renamed = {"eps": "budget"}  # old key -> new key: an old config is refused with the new name

    method: str = ""  # the stage (fixed by the registry)
    name: str = location("attack")  # redeclared for its default: the run's folder is named after the stage
    out: str = location("")  # the poisoned shard set; default <run_root>/<name>/poisoned
    data: AttackData = field(default_factory=AttackData)
    final_batch_size: int = positive(256)  # the map pass's batch (NTGA: its block)
    poison_ratio: float = 1.0  # D-VAE Tables 8-9: a seeded fraction of the keys poisoned, the rest clean
    save_noise: bool = False  # also store the int8 noise per sample (noise.npy)

    def validate(self) -> None:
        require(0 < self.poison_ratio <= 1, f"poison_ratio must be in (0, 1], got {self.poison_ratio}")


class NoiseStats:
    """Running statistics of the written noise, combined across ranks at the end: ℓ∞ (/255 levels), ℓ2 (the
    image's [0, 1] units, reported ×255 as ``l2_mean`` /255 for the ℓ∞ family), ℓ0 (changed pixel positions),
    and the samples over the budget."""

    def __init__(self, device: torch.device, budget: Budget) -> None:
        self.budget = budget
        self.sums = RunningSums(device, sums=("n", "l2", "l0", "violations", "poisoned"), maxima=("linf", "l2max"))

    def update(self, clean: torch.Tensor, poisoned: torch.Tensor) -> None:
        linf, l2, l0 = (measure(clean, poisoned, n) for n in ("linf", "l2", "l0"))
        size = {"linf": linf, "l2": l2, "l0": l0}[self.budget.norm]
        self.sums.add(
            n=clean.shape[0],
            l2=l2.sum() * 255.0,
            l0=l0.sum(),
            violations=self.budget.violations(size).sum(),
            poisoned=(l0 > 0).sum(),
        )
        self.sums.maximum(linf=linf.max(), l2max=l2.max())

    def result(self, accelerator: Any) -> Dict[str, float]:
        """Collective. Over the whole set, also after a resumed pass (the map pass keeps per-shard sums)."""
        r = self.sums.result(accelerator)
        n = max(r["n"], 1.0)
        return {
            "samples": int(r["n"]),
            "budget": str(self.budget),
            "linf_max": max(r["linf"], 0.0),
            "l2_mean": r["l2"] / n,
            "l2_max": max(r["l2max"], 0.0),
            "l0_mean": r["l0"] / n,
            "changed_samples": int(r["poisoned"]),
            "eps_violations": int(r["violations"]),
        }


def check_test_set(cfg: Any, m: Manifest) -> None:
    """Before any work: an attack's optional clean test set (``data.test``, where its surrogate or source model is
    scored) must have the train set's classes and image size, else its "clean test accuracy" means nothing."""
    if getattr(cfg.data, "test", ""):
        m.check_compatible(
            load_manifest(cfg.data.test), what=f"data.train {cfg.data.train} vs data.test {cfg.data.test}: "
        )


def poison_keys(m: Manifest, *, ratio: float, seed: int) -> Optional[Set[int]]:
    """The keys a ``poison_ratio`` < 1 poisons: exactly round(ratio · N) of them, a seeded draw over the set's keys
    (None = all). When the manifest cannot list the keys (gaps it does not record), each key is kept by a seeded
    hash draw instead, which gives the fraction only on average (said in the manifest)."""
    if ratio >= 1.0:
        return None
    if round(ratio * m.num_samples) == 0:
        raise ConfigError(
            f"poison_ratio={ratio:g} of {m.num_samples} samples poisons none (round(ratio x N) = 0); "
            f"use at least {1 / m.num_samples:.2g}"
        )
    keys = keys_of(m)
    if keys is None:
        return None
    g = torch.Generator().manual_seed(seed * 7_919 + 104_729)
    take = torch.randperm(len(keys), generator=g)[: round(ratio * len(keys))].tolist()
    return {keys[i] for i in take}


def _hash_kept(key: int, *, ratio: float, seed: int) -> bool:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < ratio


def _noise_info(
    cfg: Any, budget: Budget, *, ratio: float, chosen: Optional[Set[int]], extra: Optional[Dict[str, Any]]
) -> Dict[str, Any]:
    """The poisoned manifest's ``noise`` record: method, budget, the stage's ``extra``, and (``ratio`` < 1) which
    keys were poisoned and by which rule."""
    info: Dict[str, Any] = {"method": cfg.method, "norm": budget.norm, "eps": budget.eps, **(extra or {})}
    if ratio < 1.0:
        info["poison"] = {
            "ratio": ratio,
            "seed": cfg.seed,
            "rule": "exact seeded draw" if chosen is not None else "seeded hash per key (fraction on average)",
            "keys": sorted(chosen) if chosen is not None else None,
        }
    return info


def write_poisoned(
    cfg: Any,
    accelerator: Any,
    run_dir: Path,
    *,
    make_delta: Optional[Callable],
    stage: str,
    extra: Optional[Dict[str, Any]] = None,
    aux: Optional[Path] = None,
    budget: Optional[Budget] = None,
) -> Dict[str, Any]:
    """Phase 2: the shard map pass that writes clip(x + δ) for every sample (resumable by shard).

    ``make_delta(x, y, keys)`` gives δ in [0, 1] units; or, with ``make_delta=None`` and ``aux`` (an already
    poisoned set of the same samples), δ = aux − x is re-quantized and checked. ``budget`` (default ℓ∞ ``cfg.budget``)
    is applied to every sample and checked on what is written: a sample over it stops the job. With
    ``cfg.poison_ratio`` < 1 only a seeded subset of the keys is perturbed (δ is computed for those alone), the
    rest is copied; the manifest lists the poisoned keys. The main process then draws ``run_dir/grid.png``
    (:func:`write_attack_grid`). ``cfg`` is any config with the noise fields
    (``out``, ``data``, ``final_batch_size``, ``method``, ``seed``, ``save_noise``, ``progress``)."""
    out = Path(cfg.out) if cfg.out else run_dir / "poisoned"
    budget = budget or Budget("linf", float(cfg.budget))
    stats = NoiseStats(accelerator.device, budget)
    ratio = float(getattr(cfg, "poison_ratio", 1.0))
    train = load_manifest(cfg.data.train)
    check_budget_fits(budget, train)
    chosen = poison_keys(train, ratio=ratio, seed=cfg.seed)

    def selected(keys: List[str]) -> torch.Tensor:
        if ratio >= 1.0:
            return torch.ones(len(keys), dtype=torch.bool)
        if chosen is not None:
            return torch.tensor([int(k) in chosen for k in keys], dtype=torch.bool)
        return torch.tensor([_hash_kept(int(k), ratio=ratio, seed=cfg.seed) for k in keys], dtype=torch.bool)

    def fn(
        x_u8: torch.Tensor, y: torch.Tensor, keys: List[str], prev_u8: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        mask = selected(keys).to(x_u8.device)
        poisoned = x_u8.clone()
        if mask.any():
            xs, idx = x_u8[mask], mask.nonzero().flatten().tolist()
            if make_delta is None:
                delta = (prev_u8[mask].float() - xs.float()) / 255  # type: ignore[index]
            else:
                delta = make_delta(to_unit(xs), y[mask], [keys[i] for i in idx])
            poisoned[mask] = budget.apply(xs, delta)
        stats.update(x_u8, poisoned)
        return poisoned

    def extras(x_u8: torch.Tensor, p: torch.Tensor) -> List[Dict[str, bytes]]:
        if not cfg.save_noise:
            return [{} for _ in range(x_u8.shape[0])]
        d = (p.to(torch.int16) - x_u8.to(torch.int16)).to(torch.int8).permute(0, 2, 3, 1).cpu().numpy()
        return [{"noise.npy": npy_bytes(a)} for a in d]

    info = _noise_info(cfg, budget, ratio=ratio, chosen=chosen, extra=extra)
    t0 = time.time()
    m = run_map_pass(
        Path(cfg.data.train),
        out,
        fn,
        accelerator=accelerator,
        stage=stage,
        config=identity(cfg),
        batch_size=cfg.final_batch_size,
        num_workers=cfg.data.workers,
        extras_fn=extras,
        extra={"noise": info},
        progress=cfg.progress,
        aux=aux,
        stats=[stats.sums],
    )
    res = stats.result(accelerator)
    _check_written(res, budget=budget, out=out, intended=len(chosen) if chosen is not None else ratio * m.num_samples)
    if accelerator.is_main_process:  # every attack's set ends here, complete and checked: draw it once
        write_attack_grid(Path(cfg.data.train), out, run_dir / GRID)
    spent = pass_seconds(m, accelerator, time.time() - t0)  # over every run of the pass
    return {"out": str(out), "manifest": m, "time_s": spent, **res}


def _check_written(res: Dict[str, Any], *, budget: Budget, out: Path, intended: float) -> None:
    """What the pass wrote is what the attack claims: no sample over the budget (a bug: RuntimeError), and not
    nothing changed where samples were to be poisoned (a setting that poisons nothing: ConfigError); fewer than
    half of them changed is said in the log (a budget too small to survive rounding, or saturated images)."""
    res["intended_samples"] = int(round(intended))
    if res["eps_violations"]:
        raise RuntimeError(f"{res['eps_violations']} samples exceed the budget {budget}: refusing to trust {out}")
    if intended >= 1 and res["changed_samples"] == 0:
        raise ConfigError(
            f"{out}: the attack changed none of the {res['intended_samples']} samples it was to poison (budget "
            f"{budget}): its settings poison nothing (a budget too small to change a whole /255 level?)"
        )
    if res["changed_samples"] < 0.5 * intended:
        log.warning("%s: only %d of %d samples to poison changed", out, res["changed_samples"], round(intended))


GRID = "grid.png"  # an attack's picture, in its run folder beside metrics.json


def write_attack_grid(clean: Path, poisoned: Path, path: Path, classes: int = 10) -> Optional[Path]:
    """A PNG of the attack: one row per class (the first sample of each of the first ``classes`` labels met in
    shard 0), columns clean | poisoned | the noise stretched to the full range per image (mid-grey: a sample left
    clean). A picture that cannot be drawn is logged, never fatal to a finished set; returns the path or None."""
    try:
        (_, x), (_, p) = read_one_per_class([("clean", clean), ("poisoned", poisoned)], classes)
        return comparison_grid([("clean", x), ("poisoned", p), ("noise", noise_view(p, x))], path)
    except (OSError, ValueError, IndexError) as e:
        log.warning("%s: no picture drawn (%s)", path, e)
        return None


def check_budget_fits(budget: Budget, m: Manifest) -> None:
    """Refuse a budget beyond what an image of the set can hold: ℓ2 over √(C·H·W) (every pixel moved by the whole
    range), ℓ0 over H·W positions. Such a value is a typo (``l2=1e6``), not a weaker constraint."""
    h, w = m.image_size[0], m.image_size[1]
    top = {"l2": (3 * h * w) ** 0.5, "l0": float(h * w), "linf": 255.0}[budget.norm]
    if budget.eps > top:
        raise ConfigError(
            f"budget {budget} is more than a {h}x{w} image can hold (at most {top:g}): "
            "it would allow destroying the image, or overflow"
        )


def batch_gen(seed: int, keys: List[str], device: Optional[torch.device] = None) -> torch.Generator:
    """A generator that depends only on the batch's first key: a resumed pass draws what an uninterrupted one did.
    It lives on ``device`` (the batch's), so the final pass draws there (the same numbers as today on a CPU)."""
    return torch.Generator(device=device or "cpu").manual_seed(seed * 1_000_003 + int(keys[0]))


def key_gen(seed: int, key: str, salt: int = 0) -> torch.Generator:
    """A generator for one sample: the same draw whatever batch, rank or resumed run the sample lands in."""
    return torch.Generator().manual_seed((seed * 1_000_003 + int(key)) * 31 + salt)


def finish_attack(
    cfg: Any,
    accelerator: Any,
    run_dir: Path,
    *,
    make_delta: Callable[[torch.Tensor, torch.Tensor, List[str]], torch.Tensor],
    budget: Budget,
    extra: Optional[Dict[str, Any]] = None,
    timings: Optional[Dict[str, float]] = None,
    summary: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The map pass that writes the poisoned set (budget applied and checked on every sample), then
    ``metrics.json``; returns the summary :func:`attack_summary` renders."""
    t0 = time.time()
    final = write_poisoned(
        cfg, accelerator, run_dir, make_delta=make_delta, stage=f"attack:{cfg.method}", extra=extra, budget=budget
    )
    times = {**(timings or {}), "final_pass_s": final.pop("time_s")}
    final.pop("manifest")
    s: Dict[str, Any] = {
        "method": cfg.method,
        "name": cfg.name,
        "train": cfg.data.train,
        "budget": str(budget),
        "eps": budget.eps,
        **(summary or {}),
        "poisoned": final.pop("out"),
        "noise": final,
        "timings": times,
        "wall_s": time.time() - t0 + sum((timings or {}).values()),
    }
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "metrics.json", s)
    accelerator.wait_for_everyone()
    return s


@torch.no_grad()
def class_sums(
    folder: Path,
    fn: Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, ...]],
    *,
    accelerator: Any,
    num_classes: int,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """Per-class sums over a shard set, split across ranks by shard and summed (collective): ``fn(x, y)`` maps a
    [0, 1] batch to per-sample tensors (B, ...) each; returns (K, ...) float64 sums per tensor plus the class counts
    last. Every sample is counted once."""
    device = accelerator.device
    loader = make_map_loader(
        folder,
        batch_size=batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=workers,
    )
    sums: Optional[List[torch.Tensor]] = None
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for batch in _bar(loader, progress=progress and accelerator.is_main_process, desc=f"class statistics {folder}"):
        if not batch["key"]:
            continue
        x = to_unit(batch["image"].to(device))
        y = batch["label"].to(device)
        parts = fn(x, y)
        if sums is None:
            sums = [torch.zeros((num_classes, *p.shape[1:]), dtype=torch.float64, device=device) for p in parts]
        for s, p in zip(sums, parts, strict=True):
            s.index_add_(0, y, p.double())
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    if sums is None:  # this rank got no shard: the shapes come from a probe of one sample of the set
        probe = next(iter(make_map_loader(folder, batch_size=1, shards=[0])))
        parts = fn(to_unit(probe["image"].to(device)), probe["label"].to(device))
        sums = [torch.zeros((num_classes, *p.shape[1:]), dtype=torch.float64, device=device) for p in parts]
    flat = torch.cat([s.flatten() for s in sums] + [counts])
    flat = accelerator.reduce(flat, reduction="sum") if accelerator.num_processes > 1 else flat
    out, i = [], 0
    for s in sums:
        out.append(flat[i : i + s.numel()].view_as(s))
        i += s.numel()
    return (*out, flat[i:])


def _bar(it: Any, *, progress: bool, desc: str) -> Any:
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


def noise_line(n: Dict[str, Any], eps: Any = None) -> str:
    """The written noise in one line, for the budget's norm (ε of the ℓ∞ family, ℓ2 / ℓ0 for the others)."""
    budget = n.get("budget") or f"ℓ∞ {eps:g}/255"
    tail = f"; {n['changed_samples']} of {n['samples']} samples changed" if "changed_samples" in n else ""
    if budget.startswith("ℓ2"):
        head = f"ℓ2 max {n['l2_max']:.3f}, mean {n['l2_mean'] / 255:.3f} per image"
    elif budget.startswith("ℓ0"):
        head = f"ℓ0 mean {n['l0_mean']:.2f} px, ℓ∞ max {n['linf_max']:.0f}/255"
    else:
        head = f"L∞ max {n['linf_max']:.0f}/255, mean L2 {n['l2_mean']:.1f}/255 per image"
    return f"{head} (budget {budget}, 0 violations){tail}"


def attack_summary(s: Dict[str, Any], run_dir: Path) -> str:
    """The end-of-job text of a noise stage: where the poisoned set is, its noise, the surrogate, the times, and
    the next command (a victim on the poisoned set)."""
    n = s["noise"]
    lines = [
        "",
        f"{s['method'].upper()} noise: {s['name']}",
        f"  poisoned shard set   {s['poisoned']}  ({n['samples']} samples)",
        f"  noise                {noise_line(n, s.get('eps'))}",
    ]
    if "surrogate_acc_poisoned" in s:
        clean = s.get("surrogate_acc_clean_test")
        lines.append(
            f"  surrogate            {s['surrogate_acc_poisoned']:.2f}% on the poisoned train set"
            + (f", {clean:.2f}% on the clean test set" if clean is not None else "")
        )
    if "source" in s:
        src = s["source"]
        acc = src.get("clean_test_top1")
        lines.append(
            f"  source model         {src['run']}"
            + (f" (clean test top-1 {acc:.2f}%)" if acc is not None else "")
            + (", trained by this job" if src.get("trained_here") else "")
        )
    if "rounds" in s:
        lines.append(f"  EM rounds            {s['rounds']} (surrogate error on x+δ {s['final_error']:.4f})")
    t = s["timings"]
    lines.append(
        "  time                 "
        + ", ".join(f"{k.replace('_s', '')} {v:.1f}s" for k, v in t.items())
        + (f" (over every run of the job); this run {s['wall_s']:.1f}s" if "wall_s" in s else "")
    )
    grid = [str(run_dir / GRID)] if (run_dir / GRID).is_file() else []
    lines.append(
        f"  wrote                {', '.join([str(run_dir / 'metrics.json'), *grid, str(run_dir / 'config.yaml')])}"
    )
    train = Path(str(s["train"]))
    victim, test = "<victim config>", ""
    if train.parent.name.startswith("synthetic"):  # the built-in sets: the synthetic victim, on the set's own test
        victim = "synthetic"
        test = "" if train.parent.name == "synthetic" else " " + shlex.quote(f"data.test={train.parent / 'test'}")
    args = f"{shlex.quote('data.train=' + str(s['poisoned']))}{test} {shlex.quote('name=' + s['name'] + '_victim')}"
    victim_cfg = f"configs/victim/{victim}.yaml" if victim == "synthetic" else victim
    lines.append(f"  next                 accelerate launch launch/victim.py --config {victim_cfg} {args}")
    return "\n".join(lines)
