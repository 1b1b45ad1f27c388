"""Configs a user can read: ``uedist stages NAME`` (every key of a stage's config: type, default, range, help) and
``--print-config`` on the launch scripts (the resolved config as YAML; nothing runs, nothing is written)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from tests.conftest import REPO
from uedist.app.cli import main as cli_main
from uedist.app.stages import describe_stage, load_stages, stage_main
from uedist.config import load_config
from uedist.engine.attacks.sem_rem import SEMConfig
from uedist.engine.train.victim import VictimConfig
from uedist.registry import STAGES

load_stages()


def _rows(text: str) -> Dict[str, List[str]]:
    """key -> [type, default, range, help] of the Markdown table ``uedist stages NAME`` prints."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("key", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def _keys(schema: type, prefix: str = "") -> List[str]:
    """Every dotted key of a schema, a nested section's own name included."""
    out, hints = [], typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _keys(hints[f.name], f"{prefix}{f.name}.")
    return out


def test_stages_sem_lists_every_key_with_type_default_range_and_help(capsys):
    assert cli_main(["stages", "sem"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sem (attack stage): ") and "SEMConfig" in out
    rows = _rows(out)
    assert rows["noise_steps"] == ["int", "10", "noise_steps >= 1", "K_u"]  # the comment beside the field
    assert rows["budget"][:3] == ["float", "8.0", "0 < budget <= 64; budget == int(budget)"]  # from validate()
    assert rows["budget"][3].startswith("ρ_u")
    assert rows["method"][1] == "sem (fixed)"  # the registry fixes it
    assert rows["augment"][2] == "one of auto, crop_flip, rrc_flip, none"  # a Literal's choices
    assert rows["optim.milestones"][1] == "[0.4, 0.8]"  # nested, dotted, with the section factory's default
    assert rows["surrogate.stem"][1] == "cifar" and rows["surrogate"][0] == "section"
    assert rows["data.batch_size"][2] == "data.batch_size >= 1"  # the outer validate() on a section's key
    assert rows["final_batch_size"][2] == "> 0" and rows["crop_pad"][2] == ">= 0"  # the loader's number rules
    assert rows["data.workers"][3].startswith("[runtime]") and rows["out"][3].startswith("[location]")
    assert rows["seed"][3] != "-" and rows["log_every"][3] != "-"  # a small base class's docstring
    # the comment block above a field, first sentence, when none is beside it
    assert rows["surrogate_input"][3].startswith("The REM/SEM reference's surrogate sees x − 0.5")
    assert set(rows) == set(_keys(SEMConfig))


@pytest.mark.parametrize("name", STAGES.names())
def test_every_stage_describes_every_key_of_its_schema(name):
    st = STAGES.get(name)
    rows = _rows(describe_stage(name))
    assert set(rows) == set(_keys(st.schema)), name
    assert all(len(r) == 4 and all(r) for r in rows.values())


def test_an_unknown_stage_is_exit_2_listing_the_known_ones(capsys):
    assert cli_main(["stages", "semm"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'semm'" in err and "did you mean 'sem'" in err and "victim" in err and "dvae" in err


def _launch(script: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / script), *args], cwd=cwd, capture_output=True, text=True, env=env
    )


def test_print_config_of_the_main_job_reads_back_to_the_same_config_and_writes_nothing(tmp_path):
    """launch/sem.py with its default config (demo.yaml, whose base: is cifar10_cpu.yaml) and overrides."""
    over = [f"run_root={tmp_path / 'runs'}", f"data.train={tmp_path / 'absent'}", "noise_steps=3", "data.batch_size=64"]
    r = _launch("sem.py", "--print-config", *over, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "printed.yaml").write_text(r.stdout)
    printed = load_config(SEMConfig, tmp_path / "printed.yaml")
    expected = load_config(SEMConfig, REPO / "configs/sem/demo.yaml", [*over, "method=sem"])
    assert printed == expected and printed.noise_steps == 3 and printed.name == "sem_demo"
    assert yaml.safe_load(r.stdout)["data"]["build"] == "configs/shards/synthetic.yaml"  # from the file, not built
    assert sorted(p.name for p in tmp_path.iterdir()) == ["printed.yaml"]  # no run folder, no data set


def test_print_config_follows_a_base_chain_and_the_method_of_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("method: rem\nbudget: 4\nadv_steps: 3\n")
    (tmp_path / "variant.yaml").write_text("base: base.yaml\nnoise_steps: 2\n")
    r = _launch("attack.py", "--config", str(tmp_path / "variant.yaml"), "--print-config", "adv_eps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    got = yaml.safe_load(r.stdout)
    assert (got["method"], got["budget"], got["adv_steps"], got["noise_steps"], got["adv_eps"]) == (
        "rem",
        4.0,
        3,
        2,
        2.0,
    )
    bad = _launch("attack.py", "--config", str(tmp_path / "variant.yaml"), "--print-config", "budgett=4")
    assert bad.returncode == 2 and "did you mean 'budget'" in bad.stderr and not bad.stdout


def test_print_config_in_process_for_the_victim_and_the_shard_builder(tmp_path, capsys):
    assert stage_main("victim", ["--print-config", "steps=7", "model.width=0.5"], default_method="victim") == 0
    (tmp_path / "v.yaml").write_text(capsys.readouterr().out)
    assert load_config(VictimConfig, tmp_path / "v.yaml") == load_config(
        VictimConfig, None, ["steps=7", "model.width=0.5"]
    )
    out = tmp_path / "built"
    assert cli_main(["shards", "build", "source=synthetic", f"out={out}", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["out"] == str(out) and not out.exists()
    with pytest.raises(SystemExit) as e:  # a bad value: the job's own error, exit 2
        stage_main("victim", ["--print-config", "steps=-1"], default_method="victim")
    assert e.value.code == 2


def test_print_config_of_a_study_reads_back_and_writes_nothing(tmp_path):
    from uedist.app.pipeline import StudyConfig

    cfg, over = REPO / "configs/pipeline/cpu_synthetic.yaml", [f"run_root={tmp_path / 'runs'}", "modes=[standard]"]
    r = _launch("pipeline.py", "--config", str(cfg), "--print-config", *over, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "study.yaml").write_text(r.stdout)
    assert load_config(StudyConfig, tmp_path / "study.yaml") == load_config(StudyConfig, cfg, over)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_every_launch_script_that_takes_a_config_offers_print_config():
    for script in sorted((REPO / "launch").glob("*.py")):
        text = script.read_text()
        if "--config" not in text:
            continue  # facescrub_download.py takes none
        offers = "stage_main(" in text or "--print-config" in text or 'main(["shards", "build"' in text
        assert offers, f"{script.name} takes --config but offers no --print-config"
