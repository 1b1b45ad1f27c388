"""Shared fixtures: small shard sets built once per session, and the real sample data beside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from uedist.config import load_config
from uedist.data.build import BuildConfig, build_shard_sets

REPO = Path(__file__).resolve().parents[1]

# Stage modules that exist only for the tests (a toy attack and a toy purifier, tests/toy_stages.py). Before
# collection they are added to UEDIST_PLUGINS (and the checkout to PYTHONPATH), so the tests parametrized over the
# registry (tests/test_stages_smoke.py) collect them like the engine's own stages, and the launch scripts and the
# study pipeline run as subprocesses find them. A new stage module for the tests is named here once; a new stage in
# uedist/engine/ needs no edit at all (uedist.app.stages.load_stages walks the engine).
TEST_PLUGINS = ("tests.toy_stages",)


def use_test_plugins() -> None:
    """Add :data:`TEST_PLUGINS` to ``UEDIST_PLUGINS`` and the checkout to ``PYTHONPATH`` (idempotent)."""
    from uedist.app.stages import PLUGINS_ENV

    have = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    os.environ[PLUGINS_ENV] = ",".join([*have, *(m for m in TEST_PLUGINS if m not in have)])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    if str(REPO) not in sys.path:  # in this process too (``tests.toy_stages``)
        sys.path.insert(0, str(REPO))


def pytest_configure(config: pytest.Config) -> None:
    use_test_plugins()


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (or $UEDIST_SHARED_DATA)."""
    env = os.environ.get("UEDIST_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"real sample data not found at {d}")
    return d


def build(out: Path, *overrides: str, source: str = "synthetic") -> Path:
    cfg = load_config(BuildConfig, None, [f"source={source}", f"out={out}", "workers=0", *overrides])
    build_shard_sets(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_sets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic 16 px, 4 classes: train 240 samples in 6 shards of 40, test 80 in 2 shards."""
    out = tmp_path_factory.mktemp("synth")
    return build(
        out,
        "synthetic.num_classes=4",
        "synthetic.size=16",
        "synthetic.num_train=240",
        "synthetic.num_test=80",
        "shard_size=40",
    )


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uedist.app.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def write_image(path: Path, mode: str = "RGB", size=(20, 24), fmt: str = "") -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode) if mode != "RGB" else Image.fromarray(arr)
    img.save(path, format=fmt or None)
    return path


def list_files(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())
