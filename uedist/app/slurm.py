"""Turn a SLURM allocation into an ``accelerate launch`` command (used by launch/slurm/*.sbatch).

One task per node runs

    python -m uedist.app.slurm [--accelerate-config configs/accelerate/multi_node.yaml] launch/<script>.py [args ...]

which reads the allocation from SLURM's environment and ``exec``s

    accelerate launch --config_file ... --num_machines $SLURM_NNODES --num_processes $((NNODES * GPUS_PER_NODE))
        --machine_rank $SLURM_NODEID --main_process_ip <first host of SLURM_JOB_NODELIST> --main_process_port <port>
        launch/<script>.py [args ...]

* nodes: ``SLURM_NNODES`` (or ``SLURM_JOB_NUM_NODES``); this node: ``SLURM_NODEID``;
* processes per node: ``UEDIST_PROCS_PER_NODE``, else ``SLURM_GPUS_ON_NODE``, else the visible CUDA devices, else 1;
* main address: ``MASTER_ADDR`` if set, else the first host of ``SLURM_JOB_NODELIST`` (expanded here, so
  ``scontrol`` is not needed: ``gpu[01-03,07],cpu5`` -> gpu01 gpu02 gpu03 gpu07 cpu5);
* port: ``MASTER_PORT`` if set, else 20000 + (job id mod 20000), so two jobs sharing a node do not collide.

Requeue: the sbatch templates pass ``--requeue``; every uedist stage resumes from its checkpoints and finished
shards, so a requeued job simply runs the same command again.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "accelerate" / "multi_node.yaml"


def expand_nodelist(spec: str) -> List[str]:
    """Expand a SLURM hostlist (``node[01-03,07],gpu-a[1-2]x,login``) into host names, in order."""
    hosts: List[str] = []
    for part in _split_top(spec.strip()):
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", part)
        if not m:
            if "[" in part or "]" in part:
                raise ValueError(f"cannot parse SLURM node list {spec!r} (at {part!r})")
            hosts.append(part)
            continue
        prefix, ranges, rest = m.groups()
        tails = expand_nodelist(rest) if "[" in rest else [rest]
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                    raise ValueError(f"bad range {r!r} in SLURM node list {spec!r}")
                nums = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
            else:
                nums = [r]
            hosts += [f"{prefix}{n}{t}" for n in nums for t in tails]
    return hosts


def _split_top(spec: str) -> List[str]:
    """Split on commas that are not inside brackets."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"unbalanced brackets in SLURM node list {spec!r}")
    return [p for p in out + [cur] if p]


def _int_env(env: Mapping[str, str], *names: str) -> Optional[int]:
    for n in names:
        v = env.get(n, "").strip()
        if v:
            m = re.match(r"\d+", v.split(":")[-1])  # SLURM_GPUS_ON_NODE may read "a100:4" on some sites
            if not m:
                raise ValueError(f"{n}={v!r} is not a number")
            return int(m.group())
    return None


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no driver: CPU
        return 0


def launch_args(env: Mapping[str, str], config: Path) -> Dict[str, str]:
    """The accelerate launch options for this node, from a SLURM environment."""
    nodes = _int_env(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    if nodes is None:
        raise RuntimeError("not inside a SLURM allocation (SLURM_NNODES is unset); run accelerate launch directly")
    node = _int_env(env, "SLURM_NODEID") or 0
    if not 0 <= node < nodes:
        raise RuntimeError(f"SLURM_NODEID={node} outside 0..{nodes - 1}")
    per_node = _int_env(env, "UEDIST_PROCS_PER_NODE", "SLURM_GPUS_ON_NODE") or _visible_gpus() or 1
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise RuntimeError("set MASTER_ADDR or SLURM_JOB_NODELIST to find the main node")
        hosts = expand_nodelist(nodelist)
        if len(hosts) < nodes:
            raise RuntimeError(f"SLURM_JOB_NODELIST names {len(hosts)} hosts for {nodes} nodes: {nodelist!r}")
        addr = hosts[0]
    port = _int_env(env, "MASTER_PORT")
    if port is None:
        port = 20000 + (_int_env(env, "SLURM_JOB_ID") or 0) % 20000
    return {
        "config_file": str(config),
        "num_machines": str(nodes),
        "num_processes": str(nodes * per_node),
        "machine_rank": str(node),
        "main_process_ip": addr,
        "main_process_port": str(port),
    }


def command(env: Mapping[str, str], config: Path, script: List[str]) -> List[str]:
    args = launch_args(env, config)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    for k, v in args.items():
        cmd += [f"--{k}", v]
    return cmd + script


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--accelerate-config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"accelerate config (default {DEFAULT_CONFIG.relative_to(REPO)})",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("script", nargs=argparse.REMAINDER, help="launch/<script>.py and its arguments")
    args = p.parse_args(argv)
    if not args.script:
        p.error("give the script to launch, e.g. launch/sem.py --config configs/sem/imagenet100.yaml")
    if not args.accelerate_config.is_file():
        p.error(f"no accelerate config at {args.accelerate_config}")
    try:
        cmd = command(os.environ, args.accelerate_config, args.script)
    except (RuntimeError, ValueError) as e:
        p.error(str(e))
    # Every node writes its own line (its command, machine rank included) to its own job log, so not the rank-aware
    # logger, which would silence nodes 1..N-1 (their SLURM_PROCID is their rank); with --dry-run it is the product.
    sys.stdout.write("uedist.app.slurm: " + " ".join(shlex.quote(c) for c in cmd) + "\n")
    sys.stdout.flush()  # before execv replaces the process
    if args.dry_run:
        return 0
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
