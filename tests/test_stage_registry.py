"""Adding a stage is one module plus one YAML. ``tests/toy_stages.py`` is that module for a toy attack
(``toy_checker``) and a toy purifier (``toy_posterize``); nothing else in the tree names them. The tests run each
through its launch script (a real subprocess that finds it through UEDIST_PLUGINS, set by ``tests/conftest.py``),
run both in a study (``launch/pipeline.py``), check that the registry-parametrized smoke and budget tests collect
them with no other edit, and check what the registry tells the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli
from tests.toy_stages import ToyAttackConfig, ToyPurifyConfig, generate_toy, posterize
from uedist.app.stages import load_stages
from uedist.config import parse_override
from uedist.data.images import decode_image
from uedist.data.manifest import load_manifest
from uedist.data.shards import iter_samples, verify_shard_set
from uedist.ops.budget import Budget
from uedist.registry import STAGES, RegistryError, stage, stages_of


def _images(folder: Path):
    size = load_manifest(folder).image_size
    return {s.key: (s.label, decode_image(s.data, s.ext, size).astype(int)) for s in iter_samples(folder)}


def _check_poisoned(clean: Path, poisoned: Path, budget: int) -> None:
    assert verify_shard_set(poisoned, decode=True).ok
    a, b = _images(clean), _images(poisoned)
    assert a.keys() == b.keys()
    for k, (y, img) in b.items():
        d = img - a[k][1]
        assert abs(d).max() <= budget and abs(d).max() > 0 and y == a[k][0]


def _check_posterized(src: Path, purified: Path, levels: int) -> None:
    import torch

    assert verify_shard_set(purified, decode=True).ok
    a, b = _images(src), _images(purified)
    assert a.keys() == b.keys()
    for k, (y, img) in b.items():
        want = posterize(torch.from_numpy(a[k][1]).to(torch.uint8), levels).numpy()
        assert y == a[k][0] and (img == want).all() and len(set(img.flatten().tolist())) <= levels


def _run(script: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_toy_stages_are_registered_with_their_schemas_and_roles():
    load_stages()  # the engine and UEDIST_PLUGINS (tests.toy_stages, from tests/conftest.py)
    st = STAGES.get("toy_checker")
    assert st.kind == "attack" and st.schema is ToyAttackConfig
    assert st.roles == {"train": "data.train", "test": "data.test"} and st.output == "poisoned"
    assert dict(st.fixed) == {"method": "toy_checker"} and st.smoke == ("budget=3",)
    assert st.budget == ("linf", "budget") and str(Budget(*st.budget_of(ToyAttackConfig(budget=5)))) == "ℓ∞ 5/255"
    pu = STAGES.get("toy_posterize")
    assert pu.kind == "purify" and pu.schema is ToyPurifyConfig and pu.output == "purified"
    assert pu.roles == {"src": "data.src", "clean": "data.clean"} and pu.budget == () and pu.budget_of(None) is None
    assert "toy_checker" in stages_of("attack") and "toy_posterize" in stages_of("purify")
    with pytest.raises(RegistryError, match="already registered"):
        stage("toy_checker", kind="attack", schema=ToyAttackConfig, inputs=())(generate_toy)
    with pytest.raises(RegistryError, match="kind must be one of"):
        stage("toy2", kind="noise", schema=ToyAttackConfig, inputs=())(generate_toy)
    with pytest.raises(RegistryError, match="key=value"):
        stage("toy3", kind="attack", schema=ToyAttackConfig, inputs=(), smoke="budget=3")(generate_toy)
    with pytest.raises(RegistryError, match="norm"):
        stage("toy4", kind="attack", schema=ToyAttackConfig, inputs=(), budget=("l3", "budget"))(generate_toy)
    assert not {"toy2", "toy3", "toy4"} & set(STAGES.names())


@pytest.mark.slow
def test_the_registry_tests_collect_the_toy_stages_with_no_other_edit():
    """The smoke and budget tests are parametrized over the registry: the toy stages are among their cases (with
    UEDIST_PLUGINS unset outside: tests/conftest.py names the toy module)."""
    env = {k: v for k, v in os.environ.items() if k != "UEDIST_PLUGINS"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_stages_smoke.py",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ids = set(r.stdout.split())
    assert "tests/test_stages_smoke.py::test_attack_end_to_end_within_its_budget[toy_checker]" in ids
    assert "tests/test_stages_smoke.py::test_purifier_end_to_end[toy_posterize]" in ids
    assert "tests/test_stages_smoke.py::test_smoke_overrides_load[toy_posterize]" in ids


@pytest.mark.slow
def test_toy_attack_runs_through_launch_attack_py(synth_sets, tmp_path):
    """A real subprocess: the stage is found through UEDIST_PLUGINS, its YAML picks it, its summary is printed."""
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump({"method": "toy_checker", "budget": 3, "data": {"train": str(synth_sets / "train")}}))
    r = _run("launch/attack.py", "--config", str(cfg), f"run_root={tmp_path}", "name=t")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"toy checkerboard noise: {tmp_path / 't' / 'poisoned'}" in r.stdout
    _check_poisoned(synth_sets / "train", tmp_path / "t" / "poisoned", 3)
    assert yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())["method"] == "toy_checker"
    # a typo in the toy's own schema is refused with the key named, like any stage's
    bad = _run("launch/attack.py", "--config", str(cfg), "budgett=3")
    assert bad.returncode == 2 and "budgett" in bad.stderr
    # without the plugin the method is unknown, and the error lists the known attack stages
    env = {k: v for k, v in os.environ.items() if k != "UEDIST_PLUGINS"}
    r = _run("launch/attack.py", "--config", str(cfg), env=env)
    assert r.returncode == 2 and "toy_checker" in r.stderr and "sem" in r.stderr


@pytest.mark.slow
def test_toy_purifier_runs_through_launch_purify_py(synth_sets, tmp_path):
    src = synth_sets / "train"
    r = _run(
        "launch/purify.py", "method=toy_posterize", "levels=3", f"data.src={src}", f"run_root={tmp_path}", "name=p"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"toy posterize (3 levels): {tmp_path / 'p' / 'purified'}" in r.stdout
    _check_posterized(src, tmp_path / "p" / "purified", 3)
    bad = _run("launch/purify.py", "method=toy_posterize", "levels=1", f"data.src={src}", f"run_root={tmp_path}")
    assert bad.returncode == 2 and "levels" in bad.stderr  # its own validate()
    env = {k: v for k, v in os.environ.items() if k != "UEDIST_PLUGINS"}
    r = _run("launch/purify.py", "method=toy_posterize", f"data.src={src}", env=env)
    assert r.returncode == 2 and "toy_posterize" in r.stderr and "jpeg" in r.stderr


@pytest.mark.slow
def test_toy_stages_run_in_a_study(synth_sets, tmp_path):
    """launch/pipeline.py expands, hashes and runs the toy attack and the toy purifier like any other stage, and
    feeds the poisoned set to the purifier and the purified set to the victim; a rerun runs nothing."""
    from uedist.app.pipeline import Study, StudyConfig
    from uedist.config import load_config

    victim = {".".join(k): v for k, v in map(parse_override, STAGES.get("victim").smoke)}
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "toy",
                "run_root": str(tmp_path),
                "datasets": {"syn": {"train": str(synth_sets / "train"), "test": str(synth_sets / "test")}},
                "attacks": {"checker": {"method": "toy_checker", "set": {"budget": 2}}},
                "purifiers": {"post": {"method": "toy_posterize", "set": {"levels": 4}}},
                "victims": {"r18": {"config": "configs/victim/synthetic.yaml", "set": victim}},
                "report": False,
            }
        )
    )
    st = Study(load_config(StudyConfig, study))
    assert [(s.kind, s.runner.name) for s in st.stages] == [
        ("attack", "toy_checker"),
        ("purify", "toy_posterize"),
        ("victim", "victim"),
    ]
    r = _run("launch/pipeline.py", "--config", str(study))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = {json.loads(p.read_text())["kind"]: json.loads(p.read_text()) for p in tmp_path.glob("toy/*/*/stage.json")}
    assert set(recs) == {"attack", "purify", "victim"}
    assert recs["attack"]["config"]["method"] == "toy_checker" and recs["purify"]["config"]["levels"] == 4
    poisoned, purified = Path(recs["attack"]["output"]), Path(recs["purify"]["output"])
    _check_poisoned(synth_sets / "train", poisoned, 2)
    _check_posterized(poisoned, purified, 4)
    assert recs["purify"]["inputs"]["src"] == str(poisoned) and recs["victim"]["inputs"]["train"] == str(purified)
    assert recs["victim"]["summary"]["test_top1"] >= 0
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
    assert "toy_checker" in rows and "toy_posterize" in rows  # the plugins of tests/conftest.py
    assert "data.src, data.clean, ddpm" in rows["jcdp"] and "poisoned" in rows["sem"]
