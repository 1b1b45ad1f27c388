"""What the attacks of the seed tables share (TAP, SEP, NTGA, LSP, AR, OPS; one module each beside this one).

Each attack is a stage ``fn(cfg, accelerator, run_dir)`` whose config extends :class:`AttackConfig` and whose
last step is :func:`finish_attack`: the shard map pass that writes ``clip(x + δ)`` for every sample (or the
``poison_ratio`` subset), applies the attack's budget (ℓ∞ / ℓ2 / ℓ0, :mod:`uedist.ops.budget`) and checks it on
every written sample (a violation stops the job), resumes by shard, and writes ``metrics.json``. δ for a batch
must depend only on the batch's samples and keys (seed generators with :func:`batch_gen`), so a resumed pass
writes the bytes an uninterrupted one does and two processes write what one does.

Also here: the clean source model of TAP and SEP (a finished victim run, or one trained first from a victim
config, recorded in the provenance) and the per-class statistics pass (OPS's pixel search, SEP's feature
centroids).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from uedist.config import ConfigError, identity, load_config, location, positive, require, runtime, save_config
from uedist.data.loaders import make_map_loader
from uedist.data.manifest import Manifest, load_manifest
from uedist.dist import get_logger
from uedist.engine.noise import NoiseData, _batch_gen, write_poisoned
from uedist.io import atomic_write_json
from uedist.ops.budget import Budget
from uedist.ops.images import to_unit
from uedist.precision import use_channels_last

log = get_logger(__name__)


@dataclass
class AttackConfig:
    """The fields every attack of the seed tables has; each attack's config adds its own settings."""

    method: str = ""  # the stage (fixed by the registry)
    name: str = location("attack")
    run_root: str = location("runs")
    out: str = location("")  # the poisoned shard set; default <run_root>/<name>/poisoned
    seed: int = 0
    data: NoiseData = field(default_factory=NoiseData)
    final_batch_size: int = positive(256)  # the map pass's batch (NTGA: its block)
    poison_ratio: float = 1.0  # D-VAE Tables 8-9: a seeded fraction of the keys poisoned, the rest clean
    save_noise: bool = False  # also store the int8 noise per sample (noise.npy)
    bf16: Optional[bool] = False  # null = auto: on only where bf16 is native (uedist.precision)
    channels_last: Optional[bool] = False  # null = auto: with native bf16
    progress: bool = runtime(True)
    resume: bool = runtime(True)

    def validate(self) -> None:
        require(0 < self.poison_ratio <= 1, f"poison_ratio must be in (0, 1], got {self.poison_ratio}")


@dataclass
class SourceSpec:
    """The clean model TAP and SEP attack (their papers: a ResNet-18 trained on the clean set)."""

    source_model: str = ""  # a finished victim run folder (config.yaml + checkpoints/); empty: train one first
    source_victim: str = "configs/victim/cifar10_quick.yaml"  # the victim config trained when source_model is empty
    source_overrides: List[str] = field(default_factory=list)  # key=value for that victim config


def batch_gen(seed: int, keys: List[str]) -> torch.Generator:
    """A generator that depends only on the batch's first key (see :func:`uedist.engine.noise._batch_gen`)."""
    return _batch_gen(seed, keys)


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
    ``metrics.json``; returns the summary :func:`uedist.engine.noise.noise_summary` renders."""
    t0 = time.time()
    final = write_poisoned(
        cfg, accelerator, run_dir, make_delta=make_delta, stage=f"noise:{cfg.method}", extra=extra, budget=budget
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


# ------------------------------------------------------------------------------------------------- source model
def source_model(
    cfg: Any, accelerator: Any, run_dir: Path, *, m: Manifest, extra: Sequence[str] = ()
) -> Tuple[Any, Dict[str, Any]]:
    """The clean model of TAP / SEP (frozen, eval mode) and its provenance: ``source_model`` (a finished victim run
    folder) or, when empty, the victim config ``source_victim`` trained first into ``<run>/source`` on
    ``data.train`` / ``data.test`` (resumable like any victim run). Returns (model, info); ``info['run']`` is the
    run folder the weights come from (SEP reads its snapshots there)."""
    from uedist.engine.victim import VictimConfig, build_victim, train_victim

    if cfg.source_model:
        vdir = Path(cfg.source_model)
        if not (vdir / "config.yaml").is_file():
            raise ConfigError(f"source_model: {vdir} is not a victim run folder (no config.yaml)")
        vcfg = load_config(VictimConfig, str(vdir / "config.yaml"), [])
        trained = False
    else:
        require(bool(cfg.source_victim), "source_model or source_victim must be set")
        vdir = run_dir / "source"
        test = [f"data.test={cfg.data.test}"] if cfg.data.test else []
        vcfg = load_config(
            VictimConfig,
            cfg.source_victim,
            [
                f"progress={str(cfg.progress).lower()}",  # the attack's runtime choice, unless the overrides say
                *cfg.source_overrides,
                *extra,  # what the attack itself needs of the run (SEP: its snapshots)
                f"data.train={cfg.data.train}",
                *test,
                f"name={cfg.name}_source",
            ],
        )
        saved = vdir / "config.yaml"
        same = saved.is_file() and identity(load_config(VictimConfig, str(saved), [])) == identity(vcfg)
        if not (same and (vdir / "metrics.json").is_file()):  # else: trained by an earlier run of this job
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_config(vcfg, saved)
            train_victim(vcfg, accelerator, vdir)  # resumes its checkpoints; refuses them if the config changed
        trained = True
    model = _load_victim_weights(vcfg, vdir, m=m, build=build_victim).to(accelerator.device).eval()
    if use_channels_last(getattr(cfg, "channels_last", False), accelerator.device):
        model = model.to(memory_format=torch.channels_last)  # with channels_last inputs (TAP, SEP)
    for p in model.parameters():
        p.requires_grad_(False)
    info = {"run": str(vdir), "trained_here": trained, "victim": identity(vcfg)}
    metrics = vdir / "metrics.json"
    if metrics.is_file():
        import json

        info["clean_test_top1"] = json.loads(metrics.read_text()).get("test_top1")
    return model, info


def _load_victim_weights(vcfg: Any, vdir: Path, *, m: Manifest, build: Callable) -> torch.nn.Module:
    from uedist.checkpoint import latest_checkpoint, load_state

    train_m = load_manifest(vcfg.data.train) if Path(vcfg.data.train).is_dir() else m
    if train_m.num_classes != m.num_classes:
        raise ConfigError(
            f"source model {vdir}: trained on {train_m.num_classes} classes, the set to poison has {m.num_classes}"
        )
    model = build(vcfg, train_m)
    path = latest_checkpoint(vdir / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"source model {vdir}: no checkpoint under {vdir / 'checkpoints'}")
    model.load_state_dict(load_state(path)["model"])
    return model


def features_and_logits(model: torch.nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of a registered classifier: the input of its last ``nn.Linear``."""
    last = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
    if not last:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to take features from")
    box: Dict[str, torch.Tensor] = {}
    h = last[-1].register_forward_hook(lambda _m, inp, _out: box.__setitem__("f", inp[0]))
    try:
        logits = model(x)
    finally:
        h.remove()
    return box["f"].flatten(1), logits
