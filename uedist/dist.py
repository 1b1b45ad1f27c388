"""Rank logic in one place: who am I, who logs, and making the Accelerator.

Library code asks ``rank()``/``world_size()``/``is_main_process()`` and logs through ``get_logger``; launch scripts
call ``setup_logging(run_dir)`` once (stdout on the main process, a file per rank under ``run_dir/logs``) and
``make_accelerator`` (the only place an ``Accelerator`` is created).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

_LOG_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


def _env_int(*names: str, default: int) -> int:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return default


def rank() -> int:
    """Global rank: torch.distributed if initialized, else the launcher's environment, else 0."""
    try:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            return tdist.get_rank()
    except ImportError:  # the data layer works without torch
        pass
    return _env_int("RANK", "SLURM_PROCID", default=0)


def world_size() -> int:
    try:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            return tdist.get_world_size()
    except ImportError:
        pass
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def is_main_process() -> bool:
    return rank() == 0


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(run_dir: Optional[os.PathLike] = None, level: int = logging.INFO) -> None:
    """stdout on the main process only (warnings from every rank), plus ``run_dir/logs/rank{r}.log`` per rank."""
    r = rank()
    fmt = logging.Formatter(_LOG_FORMAT.format(rank=r), datefmt="%H:%M:%S")
    root = logging.getLogger("uedist")
    root.setLevel(level)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(fmt)
    out.setLevel(level if r == 0 else logging.WARNING)
    root.addHandler(out)
    if run_dir is not None:
        log_dir = Path(run_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_dir / f"rank{r}.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def make_accelerator(*, cpu: Optional[bool] = None, mixed_precision: str = "no", **kwargs: Any) -> Any:
    """Create the Accelerator (launch scripts only).

    On a machine without CUDA, several processes only really sync when the accelerator is told it runs on CPU
    (see ../shared/ENVIRONMENT.md: otherwise each process trains alone, silently); so ``cpu`` defaults to
    "no CUDA available".
    """
    import torch
    from accelerate import Accelerator

    if cpu is None:
        cpu = not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, **kwargs)
