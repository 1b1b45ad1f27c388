"""Two real processes (accelerate launch, gloo): every sample is seen exactly once per map pass across ranks and
workers, and both ranks run the same number of training steps on different streams."""

import json
import os
import socket
import subprocess

import pytest

from tests.conftest import REPO
from uedist.data.manifest import load_manifest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args: str, timeout: int = 300, cwd=REPO, env_extra=None) -> subprocess.CompletedProcess:
    """`accelerate launch` with the 2-process CPU config on a free port (``env_extra``: more environment);
    returns the finished process."""
    cmd = [
        "accelerate",
        "launch",
        "--config_file",
        str(REPO / "configs/accelerate/cpu2.yaml"),
        "--main_process_port",
        str(free_port()),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_each_sample_once(synth_sets, tmp_path):
    folder = synth_sets / "train"
    out = tmp_path / "result.json"
    r = accelerate_launch(str(REPO / "tests/scripts/two_rank_pass.py"), str(folder), str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["backend"] == "gloo" and "MULTI_CPU" in res["type"]
    m = load_manifest(folder)
    all_keys = [k for rank in res["ranks"] for k in rank["keys"]]
    assert len(all_keys) == m.num_samples == len(set(all_keys))  # each sample exactly once across ranks x workers
    assert all(rank["keys"] for rank in res["ranks"])  # both ranks did real work
    assert res["counts"] == [len(res["ranks"][0]["keys"]), 12, len(res["ranks"][1]["keys"]), 12]
    assert res["ranks"][0]["train"] != res["ranks"][1]["train"]  # per-rank streams
