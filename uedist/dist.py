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
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import datetime

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
    """stdout on the main process only (warnings from every rank), errors on stderr (every rank: the message of
    a job that exits 2 is where a shell user looks for it), plus ``run_dir/logs/rank{r}.log`` per rank."""
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
    out.addFilter(lambda rec: rec.levelno < logging.ERROR)
    root.addHandler(out)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    err.setLevel(logging.ERROR)
    root.addHandler(err)
    if run_dir is not None:
        log_dir = Path(run_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_dir / f"rank{r}.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)


DEFAULT_COLLECTIVE_TIMEOUT_S = 1800  # a rank waits this long for its peers (a map pass's last, slowest shard)
TIMEOUT_ENV = "UEDIST_COLLECTIVE_TIMEOUT"
COLLECTIVES = (
    "barrier",
    "all_reduce",
    "reduce",
    "broadcast",
    "all_gather",
    "gather",
    "all_gather_object",
    "broadcast_object_list",
    "reduce_scatter",
    "all_to_all",
    "send",
    "recv",
)


class CollectiveTimeout(RuntimeError):
    """A collective (barrier, all-reduce, ...) waited longer than the collective timeout: a peer rank stopped
    answering (stopped, swapping, hung on I/O, killed without its launcher noticing)."""


def collective_timeout() -> "datetime.timedelta":
    """How long a collective may wait: ``$UEDIST_COLLECTIVE_TIMEOUT`` seconds, default 1800 (30 min: enough
    for the ranks of a map pass to finish their last, slowest shard; set it higher for huge JCDP shards)."""
    import datetime

    from uedist.config import ConfigError  # bad input: exit 2 naming the variable, not a traceback

    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else float(DEFAULT_COLLECTIVE_TIMEOUT_S)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected seconds (a number > 0)") from None
    if not (seconds > 0 and seconds < 10**7):  # also refuses inf / nan and timedelta overflow
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected seconds (a number > 0 and < 1e7)")
    return datetime.timedelta(seconds=seconds)


def as_collective_timeout(e: BaseException) -> Optional[CollectiveTimeout]:
    """``e`` as a :class:`CollectiveTimeout` naming this rank and the collective (the innermost
    ``torch.distributed`` collective in its traceback, else "a collective"), when ``e`` is a process group's
    timeout; else None."""
    import torch.distributed as dist

    text = str(e).lower()
    if not isinstance(e, RuntimeError) or not ("timed out" in text or "timeout" in text):
        return None
    if not (dist.is_available() and dist.is_initialized()):  # e.g. a DataLoader timeout: not a collective
        return None
    op, tb = "", e.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_name
        if name in COLLECTIVES and "distributed" in tb.tb_frame.f_code.co_filename:
            op = name
        tb = tb.tb_next
    seconds = collective_timeout().total_seconds()
    what = f"collective {op}" if op else "a collective (e.g. the gradient all-reduce)"
    return CollectiveTimeout(
        f"rank {rank()}: {what} timed out after {seconds:g} s: a peer rank stopped answering; "
        f"this rank exits (raise {TIMEOUT_ENV} if the peers are only slow)"
    )


def make_accelerator(*, cpu: Optional[bool] = None, mixed_precision: str = "no", **kwargs: Any) -> Any:
    """Create the Accelerator (launch scripts only), its process group with the collective timeout
    (:func:`collective_timeout`), so a rank whose peer stopped exits instead of waiting for ever.

    On a machine without CUDA, several processes only really sync when the accelerator is told it runs on CPU
    (otherwise each process trains alone, silently: docs/cluster.md); so ``cpu`` defaults to
    "no CUDA available".
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if cpu is None:
        cpu = not torch.cuda.is_available()
    handlers = list(kwargs.pop("kwargs_handlers", []))
    if not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
        handlers.append(InitProcessGroupKwargs(timeout=collective_timeout()))
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=handlers, **kwargs)
