"""Every registered stage end to end through its launch script, at the size its ``@stage(smoke=...)`` declares, on
the tiny synthetic set (``synth_sets``: 16 px, 4 classes, 240 train / 80 test images).

- every attack writes within the budget it declares (``@stage(budget=(norm, key))``, measured on every written
  sample), reports that budget where it reports one, changes most samples, and writes with 2 processes what it
  writes with 1;
- every purifier writes a verified set of the same keys and labels;
- the victim and DDPM stages run (a DDPM run is also the ``ddpm`` input of the diffusion purifiers).

The cases come from the registry (:func:`uedist.app.stages.load_stages`: every module of the engine, and the
``UEDIST_PLUGINS`` modules, which tests/conftest.py extends with the test-only stages of tests/toy_stages.py), so a
stage added in one module is tested here with no other edit. A stage's inputs are given by role: the shard-set roles
(``train``, ``test``, ``src``, ``clean``) are the synthetic sets; a role named after a stage whose output is its run
folder (``ddpm``) is that stage's own smoke run."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch

from tests.conftest import REPO
from tests.test_multiprocess import accelerate_launch
from uedist.app.stages import load_stages
from uedist.config import load_config
from uedist.data.images import decode_image
from uedist.data.manifest import load_manifest
from uedist.data.shards import iter_samples, verify_shard_set
from uedist.ops.budget import Budget
from uedist.registry import STAGES, StageDef, stages_of

load_stages()
ATTACKS = stages_of("attack")
PURIFIERS = stages_of("purify")
TRAINERS = [*stages_of("victim"), *stages_of("ddpm")]
SCRIPT = {"attack": "launch/attack.py", "purify": "launch/purify.py", "victim": "launch/victim.py"}
SCRIPT["ddpm"] = "launch/ddpm.py"


def _fields(schema: type) -> List[str]:
    return [f.name for f in dataclasses.fields(schema)]


def smoke_args(st: StageDef, inputs: Dict[str, Path], root: Path, name: str) -> List[str]:
    """The command line of one smoke run: the stage's method, its smoke overrides, its inputs by role, where."""
    fields = _fields(st.schema)
    args = [f"method={st.name}"] if "method" in fields else []
    args += [*st.smoke, *(f"{st.roles[r]}={p}" for r, p in inputs.items()), f"name={name}", f"run_root={root}"]
    if "out" in fields and st.output not in ("", "run"):
        args.append(f"out={root / name / st.output}")
    return args + (["progress=false"] if "progress" in fields else [])


def launch(st: StageDef, args: List[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / SCRIPT[st.kind]), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def stage_inputs(synth_sets: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[StageDef], Dict[str, Path]]:
    """``inputs(st)``: role -> path for every input of ``st``. A run-folder input (``ddpm``) is the smoke run of the
    stage of that name, trained once per session."""
    sets = {"train": synth_sets / "train", "test": synth_sets / "test"}
    sets.update(src=sets["train"], clean=sets["train"])
    runs: Dict[str, Path] = {}

    def run_of(role: str) -> Path:
        if role not in runs:
            st = STAGES.get(role)
            root = tmp_path_factory.mktemp(f"input_{role}")
            r = launch(st, smoke_args(st, inputs(st), root, role))
            assert r.returncode == 0, f"the smoke run of {role} (an input): " + r.stderr[-3000:]
            runs[role] = root / role
        return runs[role]

    def inputs(st: StageDef) -> Dict[str, Path]:
        out = {}
        for role in st.roles:
            if role in sets:
                out[role] = sets[role]
            elif role in STAGES and STAGES.get(role).output == "run":
                out[role] = run_of(role)
            else:
                raise AssertionError(
                    f"stage {st.name}: no smoke input for role {role!r}; teach stage_inputs in {__file__}"
                )
        return out

    return inputs


def _decoded(folder: Path):
    size = load_manifest(folder).image_size
    for s in iter_samples(folder):
        yield s, torch.from_numpy(decode_image(s.data, s.ext, size)).permute(2, 0, 1)[None]


def check_budget(clean: Path, poisoned: Path, budget: Budget) -> int:
    """Every written sample within ``budget`` (measured on the decoded PNGs), keys, labels and order kept; returns
    how many samples changed."""
    assert verify_shard_set(poisoned, decode=True).ok
    changed = 0
    for (a, x), (b, p) in zip(_decoded(clean), _decoded(poisoned), strict=True):
        assert (a.key, a.label) == (b.key, b.label) and b.ext == "png"
        size = budget.measure(x, p)
        assert not budget.violations(size).any(), f"{b.key}: {size.item()} over {budget}"
        changed += bool((x != p).any())
    return changed


def _shards(folder: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


# ----------------------------------------------------------------------------------------------------------- fast
@pytest.mark.parametrize("name", STAGES.names())
def test_smoke_overrides_load(name):
    """Each stage's smoke overrides are valid keys and values of its schema; each attack declares its budget."""
    st = STAGES.get(name)
    ins = [f"{key}=inputs/{role}" for role, key in st.roles.items()]  # placeholders: nothing is read here
    cfg = load_config(st.schema, None, [*st.smoke, *ins, *(f"{k}={v}" for k, v in st.fixed)])
    if st.kind == "attack":
        assert st.budget, f"attack {name} declares no budget: @stage(..., budget=(norm, config key))"
        assert isinstance(Budget(*st.budget_of(cfg)), Budget)
        assert st.output, f"attack {name} declares no output set"
    else:
        assert not st.budget, f"{st.kind} stage {name} declares a budget; only attacks have one"


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("name", ATTACKS)
def test_attack_end_to_end_within_its_budget(name, stage_inputs, tmp_path):
    st = STAGES.get(name)
    ins = stage_inputs(st)
    r = launch(st, smoke_args(st, ins, tmp_path / "one", name))
    assert r.returncode == 0, r.stderr[-3000:]
    assert st.summary is None or r.stdout.strip()
    run = tmp_path / "one" / name
    budget = Budget(*st.budget_of(load_config(st.schema, run / "config.yaml")))
    out = run / st.output
    n = load_manifest(ins["train"]).num_samples
    assert check_budget(ins["train"], out, budget) > n // 2  # the noise is really there (OPS: a pixel may stay)
    m = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    noise = m.get("noise", {})
    if "budget" in noise:  # what the stage reports of its own budget is the declared one
        assert noise["budget"] == str(budget) and noise["eps_violations"] == 0
    if isinstance(load_manifest(out).extra.get("noise"), dict):
        assert load_manifest(out).extra["noise"]["norm"] == budget.norm
    # 2 processes write what 1 does, given the models the 1-process run trained (its run folder without its
    # output, which is what a rerun resumes from)
    two = tmp_path / "two" / name
    shutil.copytree(run, two, ignore=lambda d, names: [st.output, "metrics.json", "logs"] if Path(d) == run else [])
    r2 = accelerate_launch(str(REPO / SCRIPT[st.kind]), *smoke_args(st, ins, tmp_path / "two", name), timeout=600)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-3000:]
    assert _shards(two / st.output) == _shards(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", PURIFIERS)
def test_purifier_end_to_end(name, stage_inputs, tmp_path):
    st = STAGES.get(name)
    ins = stage_inputs(st)
    r = launch(st, smoke_args(st, ins, tmp_path, name))
    assert r.returncode == 0, r.stderr[-3000:]
    assert st.summary is None or r.stdout.strip()
    out = tmp_path / name / st.output
    assert verify_shard_set(out, decode=True).ok
    src = [(s.key, s.label) for s in iter_samples(ins["src"])]
    assert [(s.key, s.label) for s in iter_samples(out)] == src
    assert load_manifest(out).image_size == load_manifest(ins["src"]).image_size


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINERS)
def test_training_stage_end_to_end(name, stage_inputs, tmp_path):
    st = STAGES.get(name)
    r = launch(st, smoke_args(st, stage_inputs(st), tmp_path, name))
    assert r.returncode == 0, r.stderr[-3000:]
    m: Dict[str, Any] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert m and (tmp_path / name / "config.yaml").is_file()
