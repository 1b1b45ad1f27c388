"""An attack checks what it is given before it trusts it (Reliability II, items 7 and the source-model tracebacks):
TAP / SEP refuse a source run that has not finished, a source whose config.yaml no longer matches its checkpoint
(the refused-rerun overwrite of item 1), and a source trained on other images, each with exit 2 naming the run."""

import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO


@pytest.fixture(scope="module")
def victim_run(synth_sets, tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    args = [
        sys.executable, str(REPO / "launch/victim.py"), "--config", str(REPO / "configs/victim/synthetic.yaml"),
        f"data.train={synth_sets / 'train'}", f"data.test={synth_sets / 'test'}", f"run_root={root}", "name=v",
        "progress=false", "data.workers=0", "model.width=0.125", "epochs=0", "steps=3", "bf16=false",
    ]  # fmt: skip
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "v"


def _tap(synth_sets, tmp_path, source):
    args = [
        sys.executable, str(REPO / "launch/attack.py"), "--config", str(REPO / "configs/tap/demo.yaml"),
        f"data.train={synth_sets / 'train'}", f"data.test={synth_sets / 'test'}", f"run_root={tmp_path}", "name=t",
        f"source_model={source}", "steps=1", "restarts=1", "progress=false", "data.workers=0",
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def _damaged(victim_run, tmp_path, case):
    src = tmp_path / f"src_{case}"
    shutil.copytree(victim_run, src)
    if case == "unfinished":
        (src / "metrics.json").unlink()
    elif case == "edited config":  # e.g. overwritten by a refused rerun with other settings
        cfg = yaml.safe_load((src / "config.yaml").read_text())
        cfg["model"]["width"] = 0.25
        (src / "config.yaml").write_text(yaml.safe_dump(cfg))
    return src


@pytest.mark.parametrize(
    "case, message",
    [("unfinished", "has not finished"), ("edited config", "does not match the config its checkpoint")],
)
def test_tap_refuses_a_source_run_it_cannot_trust(synth_sets, victim_run, tmp_path, case, message):
    r = _tap(synth_sets, tmp_path, _damaged(victim_run, tmp_path, case))
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    out = r.stdout + r.stderr
    assert message in out and "Traceback" not in out
    assert not (tmp_path / "t" / "poisoned" / "manifest.json").exists()


def test_tap_runs_from_a_finished_source(synth_sets, victim_run, tmp_path):
    r = _tap(synth_sets, tmp_path, victim_run)
    assert r.returncode == 0, r.stderr[-2000:]
