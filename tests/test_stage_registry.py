"""Adding an attack is one module plus one YAML: this module *is* that module. It defines a toy noise method (a
class-wise ±ε checkerboard) with its own config schema and registers it with ``@stage``; nothing else in the tree
knows it. The tests run it through ``launch/attack.py`` (a real subprocess that finds it through UEDIST_PLUGINS)
and through a study, and check what the registry tells the CLI."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import yaml

from tests.conftest import REPO, run_cli
from uedist.config import identity, location, runtime
from uedist.data.manifest import load_manifest
from uedist.data.shards import iter_samples, verify_shard_set
from uedist.engine.map_pass import run_map_pass
from uedist.io import atomic_write_json
from uedist.ops.noise import quantize_noise
from uedist.registry import STAGES, RegistryError, stage


@dataclass
class ToyData:
    train: str = ""
    test: str = ""
    workers: int = runtime(0)


@dataclass
class ToyAttackConfig:
    method: str = "toy_checker"
    name: str = location("toy")
    run_root: str = location("runs")
    out: str = location("")
    data: ToyData = field(default_factory=ToyData)
    eps: int = 4  # /255
    progress: bool = runtime(False)


def toy_summary(s: Dict[str, Any], run_dir: Path) -> str:
    return f"toy checkerboard noise: {s['poisoned']} ({s['samples']} samples)"


@stage(
    "toy_checker",
    kind="attack",
    schema=ToyAttackConfig,
    inputs=("data.train", "data.test"),
    output="poisoned",
    summary=toy_summary,
)
def generate_toy(cfg: ToyAttackConfig, accelerator: Any, run_dir: Path) -> Dict[str, Any]:
    """A class-wise ±ε checkerboard whose phase is the label (an ordinary, if weak, class-wise shortcut)."""
    out = Path(cfg.out) if cfg.out else run_dir / "poisoned"

    def fn(x_u8: torch.Tensor, y: torch.Tensor, keys: List[str]) -> torch.Tensor:
        h, w = x_u8.shape[-2:]
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        sign = ((ii + jj)[None] + y[:, None, None]) % 2 * 2 - 1  # (B, H, W) in {-1, 1}
        return quantize_noise(x_u8, sign[:, None].float().expand_as(x_u8) * cfg.eps / 255, cfg.eps)

    m = run_map_pass(
        Path(cfg.data.train),
        out,
        fn,
        accelerator=accelerator,
        stage="noise:toy_checker",
        config=identity(cfg),
        batch_size=64,
        num_workers=cfg.data.workers,
        progress=cfg.progress,
    )
    s = {"method": cfg.method, "name": cfg.name, "poisoned": str(out), "samples": m.num_samples}
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "metrics.json", s)
    return s


def _check_poisoned(clean: Path, poisoned: Path, eps: int) -> None:
    assert verify_shard_set(poisoned, decode=True).ok
    a = {s.key: s for s in iter_samples(clean)}
    n = 0
    for s in iter_samples(poisoned):
        from uedist.data.images import decode_image

        size = load_manifest(poisoned).image_size
        d = decode_image(s.data, s.ext, size).astype(int) - decode_image(a[s.key].data, a[s.key].ext, size).astype(int)
        assert abs(d).max() <= eps and abs(d).max() > 0 and s.label == a[s.key].label
        n += 1
    assert n == load_manifest(clean).num_samples


def test_the_toy_stage_is_registered_with_its_schema_and_roles():
    st = STAGES.get("toy_checker")
    assert (
        st.kind == "attack"
        and st.schema is ToyAttackConfig
        and st.roles == {"train": "data.train", "test": "data.test"}
    )
    assert dict(st.fixed) == {"method": "toy_checker"}
    with pytest.raises(RegistryError, match="already registered"):
        stage("toy_checker", kind="attack", schema=ToyAttackConfig, inputs=())(generate_toy)
    with pytest.raises(RegistryError, match="kind must be one of"):
        stage("toy2", kind="noise", schema=ToyAttackConfig, inputs=())(generate_toy)


@pytest.mark.slow
def test_toy_noise_runs_through_launch_noise_py(synth_sets, tmp_path):
    """A real subprocess: the stage is found through UEDIST_PLUGINS, its YAML picks it, its summary is printed."""
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump({"method": "toy_checker", "eps": 3, "data": {"train": str(synth_sets / "train")}}))
    env = {
        **os.environ,
        "UEDIST_PLUGINS": "tests.test_stage_registry",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
    }
    r = subprocess.run(
        [sys.executable, str(REPO / "launch/attack.py"), "--config", str(cfg), f"run_root={tmp_path}", "name=t"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"toy checkerboard noise: {tmp_path / 't' / 'poisoned'}" in r.stdout
    _check_poisoned(synth_sets / "train", tmp_path / "t" / "poisoned", 3)
    assert yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())["method"] == "toy_checker"
    # a typo in the toy's own schema is refused with the key named, like any stage's
    bad = subprocess.run(
        [sys.executable, str(REPO / "launch/attack.py"), "--config", str(cfg), "epss=3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "epss" in bad.stderr
    # without the plugin the method is unknown, and the error lists the known noise stages
    env.pop("UEDIST_PLUGINS")
    r = subprocess.run(
        [sys.executable, str(REPO / "launch/attack.py"), "--config", str(cfg)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2 and "toy_checker" in r.stderr and "sem" in r.stderr


@pytest.mark.slow
def test_toy_noise_runs_in_a_study(synth_sets, tmp_path):
    """The pipeline expands, hashes and runs the toy stage like any other (in this process, where it is
    registered), and feeds its output to the next stage."""
    from uedist.app.pipeline import Study, StudyConfig
    from uedist.config import load_config
    from uedist.dist import make_accelerator

    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "toy",
                "run_root": str(tmp_path),
                "datasets": {"syn": {"train": str(synth_sets / "train"), "test": str(synth_sets / "test")}},
                "attacks": {"checker": {"method": "toy_checker", "set": {"eps": 2}}},
                "purifiers": {"gray": {"method": "grayscale", "set": {"data.workers": 0}}},
                "victims": {
                    "r18": {
                        "config": "configs/victim/synthetic.yaml",
                        "set": {
                            "model.width": 0.125,
                            "data.batch_size": 32,
                            "data.workers": 0,
                            "epochs": 0.0,
                            "steps": 2,
                            "log_every": 1,
                            "ckpt_every": 2,
                        },
                    }
                },
                "report": False,
            }
        )
    )
    st = Study(load_config(StudyConfig, study))
    assert [s.kind for s in st.stages] == ["noise", "purify", "victim"]
    noise = st.stages[0]
    assert noise.runner is STAGES.get("toy_checker") and noise.cfg.data.train == str(synth_sets / "train")
    records = st.run(make_accelerator(cpu=True))
    _check_poisoned(synth_sets / "train", Path(records[0]["output"]), 2)
    assert records[1]["inputs"]["src"] == records[0]["output"] and records[2]["summary"]["test_top1"] >= 0
    assert json.loads((noise.dir / "stage.json").read_text())["method"] == "toy_checker"
    # a rerun reuses the finished stages (same hashes) and runs nothing
    again = Study(load_config(StudyConfig, study))
    assert all(again.record(s) is not None for s in again.stages)


@pytest.mark.slow
def test_cli_lists_every_stage_with_its_inputs():
    r = run_cli("stages")
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ")}
    for name in ("sem", "rem", "em", "random", "dvae", "jcdp", "diffusion", "jpeg", "victim", "ddpm"):
        assert name in rows
    assert "data.src, data.clean, ddpm" in rows["jcdp"] and "poisoned" in rows["sem"]
