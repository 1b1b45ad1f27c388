"""The cluster path: SLURM allocation -> accelerate launch arguments, and the sbatch template run for real as two
"nodes" (two local processes, gloo) with SLURM's environment variables and a stand-in `srun`."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_multiprocess import free_port

from uedist.app.slurm import expand_nodelist, launch_args
from uedist.data.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "configs/accelerate/multi_node.yaml"


@pytest.mark.parametrize(
    "spec,hosts",
    [
        ("node7", ["node7"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[1-2],login,b[9-10]", ["a1", "a2", "login", "b9", "b10"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ],
)
def test_expand_nodelist(spec, hosts):
    assert expand_nodelist(spec) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-", "gpu[3-1]", "gpu]1["])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_launch_args_from_slurm_env():
    env = {
        "SLURM_NNODES": "4",
        "SLURM_NODEID": "2",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[10-13]",
    }
    a = launch_args(env, CFG)
    assert a == {
        "config_file": str(CFG),
        "num_machines": "4",
        "num_processes": "32",
        "machine_rank": "2",
        "main_process_ip": "gpu10",
        "main_process_port": str(20000 + 123456 % 20000),
    }
    a = launch_args({**env, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400", "UEDIST_PROCS_PER_NODE": "2"}, CFG)
    assert (a["main_process_ip"], a["main_process_port"], a["num_processes"]) == ("10.0.0.5", "29400", "8")
    with pytest.raises(RuntimeError, match="not inside a SLURM allocation"):
        launch_args({}, CFG)
    with pytest.raises(RuntimeError, match="outside"):
        launch_args({**env, "SLURM_NODEID": "4"}, CFG)
    with pytest.raises(RuntimeError, match="names 1 hosts for 4 nodes"):
        launch_args({**env, "SLURM_JOB_NODELIST": "gpu10"}, CFG)


FAKE_SRUN = """#!/bin/bash
# Stand-in for srun: one task per "node", SLURM_NODEID set as srun would, options before the command skipped.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n SLURM_PROCID=$n "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_multi_node_sbatch_runs_two_nodes(synth_sets, tmp_path):
    """launch/slurm/multi_node.sbatch as SLURM would run it on 2 nodes x 1 process: a real 2-rank job (gloo)
    where every sample is seen exactly once across the nodes."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    srun = bindir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "result.json"
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_ID": "4242",
        "UEDIST_PROCS_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    r = subprocess.run(
        [
            "bash",
            str(REPO / "launch/slurm/multi_node.sbatch"),
            "tests/scripts/two_rank_pass.py",
            str(synth_sets / "train"),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("uedist.app.slurm: ") == 2 and "--machine_rank 1" in r.stdout
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["backend"] == "gloo"
    keys = [k for rank in res["ranks"] for k in rank["keys"]]
    assert len(keys) == load_manifest(synth_sets / "train").num_samples == len(set(keys))
    assert all(rank["keys"] for rank in res["ranks"])


@pytest.mark.slow
def test_sbatch_templates_parse():
    for f in (REPO / "launch/slurm").glob("*.sbatch"):
        assert subprocess.run(["bash", "-n", str(f)]).returncode == 0, f
        text = f.read_text()
        assert "#SBATCH --requeue" in text and "python -m uedist.app.slurm" in text
        # srun does not inherit --cpus-per-task since Slurm 22.05: without it every rank of a node shares one core
        (srun,) = [line for line in text.splitlines() if line.startswith("srun ")]
        assert '--cpus-per-task="${SLURM_CPUS_PER_TASK' in srun, f
