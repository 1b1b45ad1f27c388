"""SIGKILL the noise job in each phase; the rerun completes with shards identical to an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_noise_job import TOY
from uedist.data.manifest import load_manifest
from uedist.data.shards import verify_shard_set

SLOW = ["steps=30", "ckpt_every=5", "noise_steps=6", "eot_samples=3"]  # slow enough to be caught mid-phase


def _cmd(sets, root, name, *extra):
    return [
        sys.executable,
        str(REPO / "launch/sem.py"),
        f"name={name}",
        f"run_root={root}",
        f"data.train={sets / 'train'}",
        "data.test=",
        *TOY,
        *SLOW,
        *extra,
    ]


def _shards(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def _kill_when(cmd, ready, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def reference(synth_sets, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    subprocess.run(
        _cmd(synth_sets, root, "ref"),
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return _shards(root / "ref" / "poisoned"), json.loads((root / "ref" / "metrics.json").read_text())


# "runtime_change": killed in the final pass with bars and loader workers, rerun as node.sbatch suggests
# (progress=false data.workers=0): runtime-only fields are outside the config identity, so it resumes
@pytest.mark.slow
@pytest.mark.parametrize("phase", ["surrogate", "final_pass", "runtime_change"])
def test_killed_noise_job_resumes_to_identical_shards(synth_sets, tmp_path, reference, phase):
    run = tmp_path / "killed"
    latest = run / "surrogate" / "checkpoints" / "latest"
    progress = run / "poisoned" / "_progress"
    if phase == "surrogate":
        ready = lambda: latest.is_file() and latest.read_text().strip() >= "step-00000010"  # noqa: E731
    else:
        ready = lambda: progress.is_dir() and len(list(progress.glob("shard-*.json"))) >= 1  # noqa: E731
    first = ("progress=true", "data.workers=1", "log_every=3") if phase == "runtime_change" else ()
    _kill_when(_cmd(synth_sets, tmp_path, "killed", *first), ready)
    assert not (run / "poisoned" / "manifest.json").exists()
    if phase == "surrogate":
        assert not (run / "poisoned").exists()
    r = subprocess.run(
        _cmd(synth_sets, tmp_path, "killed"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("resumed from" if phase == "surrogate" else "already written") in r.stdout + r.stderr
    assert verify_shard_set(run / "poisoned").ok
    shards, ref_metrics = reference
    assert _shards(run / "poisoned") == shards
    # the statistics cover the whole set, not only the shards this (resumed) run wrote
    noise, ref_noise = json.loads((run / "metrics.json").read_text())["noise"], ref_metrics["noise"]
    assert noise["samples"] == ref_noise["samples"] == load_manifest(run / "poisoned").num_samples
    assert (
        noise["l2_mean"] == pytest.approx(ref_noise["l2_mean"], rel=1e-9) and noise["linf_max"] == ref_noise["linf_max"]
    )
