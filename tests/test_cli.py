"""The commands users type: `uedist shards build|verify|inspect` and the main job under `accelerate launch`."""

import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import REPO, run_cli
from uedist.data.manifest import load_manifest

TINY = ["synthetic.num_train=120", "synthetic.num_test=40", "synthetic.size=16", "shard_size=50"]


@pytest.mark.slow
def test_build_verify_inspect(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("source: synthetic\nsynthetic:\n  num_classes: 3\n")
    r = run_cli("shards", "build", "--no-progress", "--config", str(cfg), f"out={tmp_path / 's'}", *TINY)
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / 's' / 'train'}: 120 samples, 3 classes, 16x16 png, 3 shards" in r.stdout
    assert (tmp_path / "s" / "build_config.yaml").is_file()
    r = run_cli("shards", "verify", "--decode", str(tmp_path / "s" / "train"), str(tmp_path / "s" / "test"))
    assert r.returncode == 0 and r.stdout.count("OK ") == 2
    grid = tmp_path / "grid.png"
    r = run_cli("shards", "inspect", str(tmp_path / "s" / "train"), "--grid", str(grid), "--per-class", "4")
    assert r.returncode == 0 and "samples     120 in 3 shards" in r.stdout and str(grid) in r.stdout
    with Image.open(grid) as img:
        assert img.size[1] > 3 * 60  # a row per class


@pytest.mark.slow
def test_config_typo_is_a_clear_error(tmp_path):
    r = run_cli("shards", "build", f"out={tmp_path}", "synthetic.num_clases=3")
    assert (
        r.returncode == 2
        and "unknown config key synthetic.'num_clases' (did you mean synthetic.'num_classes'?)" in r.stderr
    )


@pytest.mark.slow
def test_build_shards_script(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch/build_shards.py"),
            "--no-progress",
            f"out={tmp_path}",
            "splits=[test]",
            *TINY,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert load_manifest(tmp_path / "test").num_samples == 40
