"""The clean source model of TAP and SEP: a finished victim run, or one trained first from a victim config (its
provenance recorded), and the (features, logits) hook SEP aligns on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from uedist.config import ConfigError, identity, load_config, require, save_config
from uedist.data.manifest import Manifest, load_manifest
from uedist.precision import use_channels_last


@dataclass
class SourceSpec:
    """The clean model TAP and SEP attack (their papers: a ResNet-18 trained on the clean set)."""

    source_model: str = ""  # a finished victim run folder (config.yaml + checkpoints/); empty: train one first
    source_victim: str = "configs/victim/cifar10_quick.yaml"  # the victim config trained when source_model is empty
    source_overrides: List[str] = field(default_factory=list)  # key=value for that victim config


# The smoke settings of an attack on a source model (TAP, SEP): a tiny victim trained first, on the tests' set.
SOURCE_SMOKE = (
    "source_victim=configs/victim/synthetic.yaml",
    "source_overrides=[epochs=0, steps=8, model.width=0.125, data.batch_size=32, data.workers=0]",
)


def source_model(
    cfg: Any, accelerator: Any, run_dir: Path, *, m: Manifest, extra: Sequence[str] = ()
) -> Tuple[Any, Dict[str, Any]]:
    """The clean model of TAP / SEP (frozen, eval mode) and its provenance: ``source_model`` (a finished victim run
    folder) or, when empty, the victim config ``source_victim`` trained first into ``<run>/source`` on
    ``data.train`` / ``data.test`` (resumable like any victim run). Returns (model, info); ``info['run']`` is the
    run folder the weights come from (SEP reads its snapshots there)."""
    from uedist.engine.train.victim import VictimConfig, build_victim, train_victim

    if cfg.source_model:
        vdir = Path(cfg.source_model)
        if not (vdir / "config.yaml").is_file():
            raise ConfigError(f"source_model: {vdir} is not a victim run folder (no config.yaml)")
        if not (vdir / "metrics.json").is_file():
            raise ConfigError(
                f"source_model: {vdir} has not finished (no metrics.json): rerun its victim command to finish it, "
                "or name a finished run"
            )
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
    if list(train_m.image_size) != list(m.image_size):
        raise ConfigError(
            f"source model {vdir}: trained on {train_m.image_size[0]}x{train_m.image_size[1]} images, the set to "
            f"poison has {m.image_size[0]}x{m.image_size[1]}"
        )
    model = build(vcfg, train_m)
    path = latest_checkpoint(vdir / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"source model {vdir}: no checkpoint under {vdir / 'checkpoints'}")
    state = load_state(path)
    saved = state.get("identity")
    if isinstance(saved, dict) and saved != identity(vcfg):
        keys = sorted(k for k in set(saved) | set(identity(vcfg)) if saved.get(k) != identity(vcfg).get(k))
        raise ConfigError(
            f"source model {vdir}: config.yaml does not match the config its checkpoint was trained with "
            f"(differs in {', '.join(keys)}); the weights are {path}"
        )
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[:2]
        raise ConfigError(
            f"source model {vdir}: {path / 'state.pt'} does not fit the model its config.yaml builds "
            f"({' '.join(first)[:200]})"
        ) from None
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
