"""Timing for the benchmark scripts (launch/bench*.py): one rule everywhere."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], min_time: float, max_iters: int) -> float:
    """Seconds per call of ``fn``: one warm-up call, then calls until ``min_time`` seconds or ``max_iters`` calls
    (at least one). A warm-up call slower than 4 × ``min_time`` (REM at 224 px on a CPU) is its own measurement.
    CUDA work is synchronized before the clock is read."""
    t0 = time.perf_counter()
    fn()
    _sync()
    first = time.perf_counter() - t0
    if first > 4 * min_time > 0:
        return first
    n, t0 = 0, time.perf_counter()
    while n < max_iters and (n == 0 or time.perf_counter() - t0 < min_time):
        fn()
        n += 1
    _sync()
    return (time.perf_counter() - t0) / n
