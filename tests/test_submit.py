"""``uedist submit``: the written sbatch script run with a stand-in ``srun``, submitit's SLURM executor against a
stand-in ``sbatch``, a real job through submitit's local executor, the requeue checkpoint, and no submitit."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from uedist.app.cli import main as cli_main
from uedist.app.submit import ClusterJob, format_time, main, parse_time

REPO = Path(__file__).resolve().parents[1]
JOB = ["launch/attack.py", "method=random", "data.train=none/train", "data.test=none/test"]


def _stand_in(bindir: Path, name: str, body: str) -> Path:
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text("#!/bin/bash\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def _directives(script: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))


@pytest.mark.parametrize(
    "text,minutes,shown",
    [
        ("90", 90, "01:30:00"),
        ("1:30:00", 90, "01:30:00"),
        ("00:00:30", 1, "00:01:00"),
        ("45:30", 46, "00:46:00"),
        ("2-0", 2880, "2-00:00:00"),
        ("1-02:30", 1590, "1-02:30:00"),
        ("1-02:30:00", 1590, "1-02:30:00"),
    ],
)
def test_time_limits_in_every_sbatch_form(text, minutes, shown):
    assert parse_time(text) == minutes and format_time(minutes) == shown


@pytest.mark.parametrize("bad", ["", "0", "1h", "1:2:3:4", "-5"])
def test_bad_time_limits_are_refused(bad):
    with pytest.raises(ValueError, match="--time"):
        parse_time(bad)


SRUN_RECORDER = """# Stand-in for srun: record its arguments, directory and environment; run nothing.
{ printf '%s\\n' "$@"; echo "PWD=$PWD"; echo "OMP=$OMP_NUM_THREADS"; echo "PROCS=$UEDIST_PROCS_PER_NODE"; } > "$RECORD"
"""


def test_sbatch_only_writes_a_plain_script_with_the_given_values(tmp_path, monkeypatch, capsys):
    """--sbatch-only needs no submitit; the script's #SBATCH lines carry the request, it cds to the directory
    `uedist submit` ran in, and srun gets --cpus-per-task (Slurm >= 22.05 no longer passes it on)."""
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    monkeypatch.chdir(tmp_path)  # launch/attack.py is found in the checkout, the run folder is relative to here
    rc = main(
        [*JOB, "name=sb", "--nodes", "3", "--gpus-per-node", "2", "--cpus-per-task", "12", "--partition", "p1"]
        + ["--account", "a1", "--time", "1:30:00", "--mem", "100G", "--sbatch-only"]
    )
    assert rc == 0
    run = tmp_path / "runs/sb"
    path = run / "slurm/job.sbatch"
    assert f"wrote {path}" in capsys.readouterr().out
    text = path.read_text()
    d = _directives(text)
    assert {k: d[k] for k in ("nodes", "ntasks-per-node", "gres", "cpus-per-task", "partition", "account")} == {
        "nodes": "3",
        "ntasks-per-node": "1",
        "gres": "gpu:2",
        "cpus-per-task": "12",
        "partition": "p1",
        "account": "a1",
    }
    assert (d["time"], d["mem"], d["output"], d["error"]) == (
        "01:30:00",
        "100G",
        f"{run}/slurm/%j.out",
        f"{run}/slurm/%j.err",
    )
    assert "requeue" in d and d["signal"] == "B:USR1@300"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # run it as SLURM would, with a stand-in srun that records what it receives
    bindir = tmp_path / "bin"
    _stand_in(bindir, "srun", SRUN_RECORDER)
    record = tmp_path / "srun.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "UEDIST_PROCS_PER_NODE")}
    env.update(PATH=f"{bindir}:{env['PATH']}", RECORD=str(record), SLURM_CPUS_PER_TASK="12", SLURM_JOB_ID="77")
    r = subprocess.run(["bash", str(path)], env=env, cwd="/", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = record.read_text().splitlines()
    assert got[:3] == ["--ntasks-per-node=1", "--cpus-per-task=12", "--kill-on-bad-exit=1"]
    i = got.index("uedist.app.slurm")
    assert got[i + 1 : i + 3] == ["--accelerate-config", str(REPO / "configs/accelerate/multi_node.yaml")]
    assert got[i + 3 : i + 8] == [str(REPO / "launch/attack.py"), *JOB[1:], "name=sb"]
    assert got[-3:] == [f"PWD={tmp_path}", "OMP=6", "PROCS=2"]  # 12 CPUs over 2 processes


def test_dry_run_through_the_cli_writes_nothing_and_a_bad_config_fails_here(tmp_path, capsys):
    args = ["--nodes", "1", *JOB, "--run-dir", str(tmp_path / "dry"), "--gpus-per-node", "4", "--dry-run"]
    assert cli_main(["submit", *args]) == 0  # options before the script reach uedist submit's own parser
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=1" in out and "#SBATCH --gres=gpu:4" in out and "gpu_node.yaml" in out
    assert "'slurm_srun_args': ['--cpus-per-task', '32']" in out
    assert not (tmp_path / "dry").exists()
    with pytest.raises(SystemExit) as e:  # the launch script's own message, before anything is queued
        main([*JOB, "budgett=3", "--dry-run"])
    assert e.value.code == 2 and "budgett" in capsys.readouterr().err


SBATCH_RECORDER = """# Stand-in for sbatch: record its arguments and the script it is given, answer as sbatch does.
printf '%s\\n' "$@" > "$RECORD.argv"
cat "$1" > "$RECORD.script"
echo "Submitted batch job 123"
"""


def test_submitit_slurm_executor_passes_the_request_to_sbatch(tmp_path, monkeypatch, capsys):
    submitit = pytest.importorskip("submitit")
    bindir = tmp_path / "bin"
    _stand_in(bindir, "sbatch", SBATCH_RECORDER)
    _stand_in(bindir, "srun", "echo 'srun is not run at submission' >&2; exit 1\n")
    record = tmp_path / "sbatch"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(record))
    run = tmp_path / "runs/sub"
    rc = main(
        [*JOB, "--run-dir", str(run), "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "16"]
        + ["--partition", "p1", "--account", "a1", "--time", "1:30:00", "--mem", "100G"]
    )
    assert rc == 0
    assert "submitted slurm job 123" in capsys.readouterr().out
    (script_path,) = record.with_suffix(".argv").read_text().splitlines()
    text = record.with_suffix(".script").read_text()
    d = _directives(text)
    want = {"partition": "p1", "account": "a1", "nodes": "2", "gpus-per-node": "4", "cpus-per-task": "16"}
    assert {k: d.get(k) for k in want} == want
    assert (d["time"], d["ntasks-per-node"], d["mem"], d["signal"]) == ("90", "1", "100G", "USR2@120")
    assert "requeue" in d and d["output"] == f"{run}/slurm/%j_0_log.out"
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task 16" in srun and "submitit.core._submit" in srun
    assert f"cd {os.getcwd()}" in text
    # what the job will run: the pickled callable, one task per node
    job = submitit.helpers.DelayedSubmission.load(run / "slurm/123_submitted.pkl").function
    assert isinstance(job, ClusterJob) and job.script == (str(REPO / "launch/attack.py"), *JOB[1:])
    assert (job.procs_per_node, job.threads) == (4, 4)
    assert (run / "slurm/job.sbatch").is_file()


def _flags(cmd: list) -> dict:
    """``--flag value`` pairs of ``python -m accelerate.commands.launch --flag value ... script a b``."""
    return dict(zip(cmd[3:-3:2], cmd[4:-3:2]))


def test_checkpoint_requeues_the_same_command():
    submitit = pytest.importorskip("submitit")
    job = ClusterJob(("/r/launch/victim.py", "--config", "c.yaml"), "/r", "/r/multi_node.yaml", 8, 8)
    d = job.checkpoint()
    assert isinstance(d, submitit.helpers.DelayedSubmission)
    assert d.function == job and d.args == () and d.kwargs == {}
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "5"}
    cmd = job.launch_command(env)
    assert cmd == d.function.launch_command(env)
    flags = _flags(cmd)
    assert flags["--machine_rank"] == "1" and flags["--num_processes"] == "16" and flags["--main_process_ip"] == "gpu07"
    assert cmd[-3:] == ["/r/launch/victim.py", "--config", "c.yaml"]
    # outside SLURM (the local executor): one node, this machine
    local = _flags(job.launch_command({"SUBMITIT_LOCAL_JOB_ID": "9"}))
    assert (local["--num_machines"], local["--machine_rank"], local["--main_process_ip"]) == ("1", "0", "127.0.0.1")


def test_without_submitit_submit_exits_2_naming_the_ways_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert main([*JOB, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pip install submitit" in err and "--sbatch-only" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_local_executor_runs_the_job_and_logs_under_the_run_folder(synth_sets, tmp_path, monkeypatch, capsys):
    """A real (tiny) job through submitit's local executor: accelerate launch of the random-noise attack on one
    CPU process; the poisoned set is written and the task's log lands in runs/<name>/slurm/."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = [f"data.train={synth_sets / 'train'}", f"data.test={synth_sets / 'test'}", "data.workers=0"]
    rc = main(
        ["launch/attack.py", "method=random", "name=local", f"run_root={tmp_path}", *data, "progress=false"]
        + ["--executor", "local", "--gpus-per-node", "0", "--time", "10"]
    )
    assert rc == 0, capsys.readouterr()
    run = tmp_path / "local"
    assert (run / "poisoned/manifest.json").is_file() and (run / "slurm/job.sbatch").is_file()
    (log,) = (run / "slurm").glob("*_0_log.out")
    text = log.read_text()
    assert "uedist.app.submit: " in text and "--num_processes 1" in text and "RANDOM noise" in text
