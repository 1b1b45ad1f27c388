"""``uedist submit``: a launch script or a study as a SLURM job, through submitit or a plain sbatch script.

    uedist submit launch/attack.py --config configs/sem/imagenet100.yaml progress=false \\
        --nodes 2 --gpus-per-node 8 --cpus-per-task 64 --partition gpu --account proj --time 24:00:00
    uedist submit launch/pipeline.py --config configs/pipeline/imagenet100.yaml --nodes 4 --time 2-00:00:00
    uedist submit launch/victim.py --config ... --sbatch-only       # write runs/<name>/slurm/job.sbatch, no submitit
    uedist submit launch/victim.py --config ... --dry-run           # print what would be written and submitted
    uedist submit launch/attack.py --config ... --executor local --gpus-per-node 0   # run it here, through submitit

The job runs one task per node; each runs ``accelerate launch`` with the arguments :mod:`uedist.app.slurm` derives
from the allocation (machines, this node's rank, the first node as main address, nodes x GPUs processes), in the
directory ``uedist submit`` ran in, so relative paths mean what they mean on the command line. Before anything
is submitted the launch script resolves its own config (``--print-config``: a typo fails here, not after the
queue), which names the run folder ``runs/<name>``; logs go to ``runs/<name>/slurm/``.

Requeue: with submitit, SLURM signals the job two minutes before its time limit or on preemption; the task on the
first node requeues the same command (:meth:`ClusterJob.checkpoint`), which resumes from the run folder
(checkpoints, finished shards). The written ``job.sbatch`` does the same by itself (``--requeue``, and ``USR1``
five minutes before the limit runs ``scontrol requeue``). submitit is optional (``pip install submitit``, the
``slurm`` extra); ``--sbatch-only`` needs nothing beyond uedist.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from uedist.app.slurm import REPO, command

SIGNAL_DELAY_S = 120  # submitit: SLURM's warning before the time limit (nothing to save: the job checkpoints itself)
NO_SUBMITIT = (
    "submitit is not installed: pip install submitit==1.5.4 (or the slurm extra: pip install -e '.[slurm]'), "
    "or use --sbatch-only to write a plain sbatch script"
)


# ------------------------------------------------------------------------------------------------- time limits
def parse_time(text: str) -> int:
    """A SLURM time limit in any of sbatch's forms (``90``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``) as whole minutes, seconds rounded up; ValueError for anything else or zero."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    d, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if d is not None:  # days-hours[:minutes[:seconds]]
        seconds = ((d * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # hours:minutes:seconds
        seconds = (a * 60 + b) * 60 + c
    else:  # minutes[:seconds]
        seconds = a * 60 + (b or 0)
    if seconds <= 0:
        raise ValueError(f"--time {text!r}: the time limit must be positive")
    return -(-seconds // 60)


def format_time(minutes: int) -> str:
    """Minutes as sbatch's ``[D-]HH:MM:SS``."""
    d, rest = divmod(minutes, 24 * 60)
    return (f"{d}-" if d else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


# --------------------------------------------------------------------------------------------------- run folder
def resolve_run_dir(script: Path, job_args: Sequence[str], workdir: str) -> Path:
    """``<run_root>/<name>`` of the run ``script`` would make from ``job_args``, from the config the script itself
    resolves (``--print-config``: defaults, ``--config`` and its bases, overrides; nothing runs). ValueError with
    the script's own message when the config is bad, or when the script cannot print its config."""
    import yaml

    from uedist.config import run_dir

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(
        [sys.executable, str(script), *job_args, "--print-config"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        hint = "; give the run folder with --run-dir" if "--print-config" in why else ""
        raise ValueError((why if why.startswith(script.name) else f"{script.name}: {why}") + hint)
    cfg = yaml.safe_load(r.stdout)
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise ValueError(f"{script.name} --print-config printed no run name; give the run folder with --run-dir")
    return (Path(workdir) / run_dir(cfg.get("run_root", "runs"), cfg["name"])).resolve()


# ------------------------------------------------------------------------------------------------ the submission
@dataclasses.dataclass(frozen=True)
class Submission:
    """One job: what runs (``script`` and its arguments, in ``workdir``), on what, and where it logs."""

    script: Tuple[str, ...]  # the absolute launch script, then its arguments
    workdir: str
    run_dir: str
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 64
    minutes: int = 24 * 60
    partition: str = ""
    account: str = ""
    mem: str = ""
    accelerate_config: str = ""
    max_timeouts: int = 20
    python: str = sys.executable

    @property
    def log_dir(self) -> Path:
        return Path(self.run_dir) / "slurm"

    @property
    def job_name(self) -> str:
        return "uedist-" + Path(self.run_dir).name

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node or 1

    @property
    def threads(self) -> int:
        """OMP threads per process: the task's CPUs shared by the node's processes."""
        return max(1, self.cpus_per_task // self.procs_per_node)


def sbatch_script(sub: Submission) -> str:
    """The plain sbatch script of ``sub``: one task per node running ``python -m uedist.app.slurm``, requeued five
    minutes before the time limit (and on preemption or node failure, ``--requeue``)."""
    q = shlex.quote
    directives = [
        ("job-name", sub.job_name),
        ("nodes", sub.nodes),
        ("ntasks-per-node", 1),
        ("gres", f"gpu:{sub.gpus_per_node}" if sub.gpus_per_node else ""),
        ("cpus-per-task", sub.cpus_per_task),
        ("partition", sub.partition),
        ("account", sub.account),
        ("time", format_time(sub.minutes)),
        ("mem", sub.mem),
        ("output", f"{sub.log_dir}/%j.out"),
        ("error", f"{sub.log_dir}/%j.err"),
        ("open-mode", "append"),  # a requeued run keeps the job id: its log continues the same file
        ("signal", "B:USR1@300"),
    ]
    run = [sub.python, "-m", "uedist.app.slurm", "--accelerate-config", sub.accelerate_config, *sub.script]
    lines = [
        "#!/bin/bash",
        "# Written by `uedist submit` (the same job without submitit). Submit it from any directory:",
        f"#   sbatch {q(str(sub.log_dir / 'job.sbatch'))}",
        *(f"#SBATCH --{k}={q(str(v))}" for k, v in directives if v != ""),
        "#SBATCH --requeue",
        "set -euo pipefail",
        f"cd {q(sub.workdir)}",
        f'export PYTHONPATH={q(str(REPO))}"${{PYTHONPATH:+:$PYTHONPATH}}"',
        "# 5 minutes before the time limit SLURM sends USR1: requeue, so the rerun resumes where this one stopped.",
        """trap 'echo "time limit near: requeueing $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1""",
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{sub.threads}}}",
        f"export UEDIST_PROCS_PER_NODE=${{UEDIST_PROCS_PER_NODE:-{sub.procs_per_node}}}",
        "# srun no longer inherits --cpus-per-task from sbatch (Slurm 22.05): without it a node's ranks share a core",
        'srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 \\',
        "  " + " ".join(q(a) for a in run) + " &",
        "wait $!",
    ]
    return "\n".join(lines) + "\n"


def _preemption_signal() -> int:
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def _ignore_preemption_signal() -> None:
    # In the launched processes: SLURM's warning signal is for submitit's handler in the task process (which
    # requeues); the training keeps going until the requeue stops it, instead of dying on the signal's default.
    signal.signal(_preemption_signal(), signal.SIG_IGN)


@dataclasses.dataclass(frozen=True)
class ClusterJob:
    """What each submitit task (one per node) runs: ``accelerate launch`` of the script, its arguments from the
    allocation (:func:`uedist.app.slurm.command`). Checkpointable: on preemption or near the time limit it
    requeues itself unchanged, and the rerun resumes from the run folder."""

    script: Tuple[str, ...]
    workdir: str
    accelerate_config: str
    procs_per_node: int = 1
    threads: int = 1

    def launch_command(self, environ: Mapping[str, str]) -> List[str]:
        """The command this node runs. Outside SLURM (submitit's local executor) the allocation is one node,
        this machine."""
        alloc = dict(environ)
        if "SLURM_NNODES" not in alloc and "SLURM_JOB_NUM_NODES" not in alloc:
            alloc.update(SLURM_NNODES="1", SLURM_NODEID="0", SLURM_JOB_ID=alloc.get("SUBMITIT_LOCAL_JOB_ID", "0"))
            alloc.setdefault("MASTER_ADDR", "127.0.0.1")
        alloc.setdefault("UEDIST_PROCS_PER_NODE", str(self.procs_per_node))
        return command(alloc, Path(self.accelerate_config), list(self.script))

    def __call__(self) -> int:
        cmd = self.launch_command(os.environ)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(self.threads))}
        # each node's own line in its own log (not the rank-aware logger, which would silence nodes 1..N-1)
        sys.stdout.write("uedist.app.submit: " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        sys.stdout.flush()
        rc = subprocess.call(cmd, cwd=self.workdir, env=env, preexec_fn=_ignore_preemption_signal)
        if rc:
            raise RuntimeError(f"{self.script[0]} exited with code {rc} (2: bad config or input, 3: non-finite loss)")
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on preemption / near the time limit: requeue the same command (it resumes)."""
        from submitit.helpers import DelayedSubmission

        sys.stdout.write(f"uedist.app.submit: requeueing {self.script[0]}; the rerun resumes from its run folder\n")
        sys.stdout.flush()
        return DelayedSubmission(self, *args, **kwargs)


def cluster_job(sub: Submission) -> ClusterJob:
    return ClusterJob(sub.script, sub.workdir, sub.accelerate_config, sub.procs_per_node, sub.threads)


def executor_parameters(sub: Submission, cluster: str) -> Dict[str, Any]:
    """submitit ``update_parameters`` of ``sub`` (generic names, ``slurm_*`` for SLURM only)."""
    p: Dict[str, Any] = dict(
        name=sub.job_name,
        nodes=sub.nodes,
        tasks_per_node=1,
        gpus_per_node=sub.gpus_per_node,
        cpus_per_task=sub.cpus_per_task,
        timeout_min=sub.minutes,
    )
    if cluster == "slurm":
        p.update(
            slurm_signal_delay_s=SIGNAL_DELAY_S,
            slurm_srun_args=["--cpus-per-task", str(sub.cpus_per_task)],  # not inherited since Slurm 22.05
            slurm_setup=[
                f"cd {shlex.quote(sub.workdir)}",
                f'export PYTHONPATH={shlex.quote(str(REPO))}"${{PYTHONPATH:+:$PYTHONPATH}}"',
            ],
            slurm_additional_parameters={"requeue": True},  # node failures and preemptions requeue too
        )
        p.update({f"slurm_{k}": v for k, v in (("partition", sub.partition), ("account", sub.account)) if v})
        if sub.mem:
            p["slurm_additional_parameters"]["mem"] = sub.mem  # as given (200G, 0): submitit's mem_gb is GB only
    return p


def submit(sub: Submission, cluster: str = "slurm") -> Any:
    """Submit ``sub`` through submitit's ``cluster`` executor (``slurm`` or ``local``); returns the submitit job.
    ImportError without submitit."""
    import submitit

    ex = submitit.AutoExecutor(folder=sub.log_dir, cluster=cluster, slurm_max_num_timeout=sub.max_timeouts)
    ex.update_parameters(**executor_parameters(sub, cluster))
    return ex.submit(cluster_job(sub))


# ---------------------------------------------------------------------------------------------------- the command
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uedist submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("script", help="launch/<job>.py (attack, sem, victim, purify, ddpm, pipeline, ...)")
    p.add_argument("--config", help="the job's YAML, passed to the script")
    p.add_argument("overrides", nargs="*", help="the job's key=value overrides, passed to the script")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node = processes per node (0: CPU nodes)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs of the one task per node (default 8 per GPU)")
    p.add_argument("--partition", default="", help="default: sbatch's (SBATCH_PARTITION or the site's)")
    p.add_argument("--account", default="", help="default: sbatch's (SBATCH_ACCOUNT or the site's)")
    p.add_argument("--time", default="24:00:00", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (24:00:00)")
    p.add_argument("--mem", default="", help="memory per node as sbatch takes it (200G; 0 = all)")
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm", help="local: run here and wait")
    p.add_argument("--accelerate-config", help="default configs/accelerate/{gpu_node,multi_node}.yaml")
    p.add_argument("--max-timeouts", type=int, default=20, help="requeues after a time limit (preemptions: any)")
    p.add_argument("--run-dir", type=Path, help="the run folder, for a script that runs no registered stage")
    p.add_argument("--sbatch-only", action="store_true", help="write runs/<name>/slurm/job.sbatch, submit nothing")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the submission, write nothing")
    return p


def submission_from_args(args: argparse.Namespace) -> Submission:
    """The :class:`Submission` of a parsed command line; ValueError / ConfigError naming what is wrong."""
    script = Path(args.script)
    if not script.is_file() and (REPO / script).is_file():
        script = REPO / script
    if not script.is_file():
        raise ValueError(f"no launch script {args.script}")
    if args.nodes < 1 or args.gpus_per_node < 0 or (args.cpus_per_task is not None and args.cpus_per_task < 1):
        raise ValueError("--nodes and --cpus-per-task must be >= 1, --gpus-per-node >= 0")
    if args.executor == "local" and args.nodes != 1:
        raise ValueError("--executor local runs one node: --nodes 1")
    minutes = parse_time(args.time)  # the cheap checks first: resolving the run folder starts Python
    job_args = (["--config", args.config] if args.config else []) + list(args.overrides)
    run = args.run_dir.resolve() if args.run_dir else resolve_run_dir(script, job_args, os.getcwd())
    acc = args.accelerate_config or REPO / "configs/accelerate" / (
        "multi_node.yaml" if args.nodes > 1 else "gpu_node.yaml"
    )
    if not Path(acc).is_file():
        raise ValueError(f"no accelerate config at {acc}")
    return Submission(
        script=(str(script.resolve()), *job_args),
        workdir=os.getcwd(),
        run_dir=str(run),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task or 8 * max(1, args.gpus_per_node),
        minutes=minutes,
        partition=args.partition,
        account=args.account,
        mem=args.mem,
        accelerate_config=str(Path(acc).resolve()),
        max_timeouts=args.max_timeouts,
    )


def _out(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def _describe(sub: Submission) -> str:
    gpus = f"{sub.gpus_per_node} GPUs" if sub.gpus_per_node else "no GPU"
    where = ", ".join(f"{k} {v}" for k, v in (("partition", sub.partition), ("account", sub.account)) if v)
    return f"{sub.nodes} node(s) x {gpus}, {sub.cpus_per_task} CPUs per node, time {format_time(sub.minutes)}" + (
        f", {where}" if where else ""
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``uedist submit``; returns the exit code (2: bad command line or config, or no submitit)."""
    p = make_parser()
    args = p.parse_intermixed_args(argv)
    try:
        sub = submission_from_args(args)
    except ValueError as e:  # ConfigError included
        p.error(str(e))
    text = sbatch_script(sub)
    path = sub.log_dir / "job.sbatch"
    if args.dry_run:
        _out(f"# {path} (not written)\n{text}")
        _out(f"# submitit ({args.executor}) parameters: {executor_parameters(sub, args.executor)}")
        return 0
    if not args.sbatch_only:
        try:
            import submitit  # noqa: F401
        except ImportError:
            sys.stderr.write(f"error: {NO_SUBMITIT}\n")
            return 2
    sub.log_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    _out(f"wrote {path}: {_describe(sub)}; submit it with: sbatch {path}")
    if args.sbatch_only:
        return 0
    return _submit_and_report(sub, args.executor)


def _submit_and_report(sub: Submission, cluster: str) -> int:
    job = submit(sub, cluster)
    logs = sub.log_dir / f"{job.job_id}_0_log.out"
    _out(
        f"submitted {cluster} job {job.job_id}: {_describe(sub)}\n"
        f"  run folder  {sub.run_dir}\n"
        f"  logs        {logs} (and .err; node k: {job.job_id}_k_log.*), runs/<name>/logs/rank*.log"
    )
    if cluster != "local":
        _out(
            f"  requeue     on preemption and {SIGNAL_DELAY_S} s before the time limit (at most {sub.max_timeouts} "
            "time limits); the rerun resumes from the run folder"
        )
        return 0
    try:  # the local executor runs on this machine: wait for it, so the command's status is the job's
        job.result()
    except Exception as e:  # noqa: BLE001 - submitit's FailedJobError carries the task's traceback
        sys.stderr.write(f"error: local job {job.job_id} failed ({logs}): {str(e).splitlines()[0]}\n")
        return 1
    _out(f"local job {job.job_id} finished: {logs}")
    return 0
