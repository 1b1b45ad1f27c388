"""The one timing rule of the benchmarks, FLOP counting, the device's measured GEMM peak, the machine description,
and :class:`Setting` (where and how a benchmark runs).

Every benchmark times with :func:`timed` / :func:`timed_calls`: one warm-up call, then
``torch.utils.benchmark.Timer.blocked_autorange`` (blocks of calls until ``min_time`` seconds; the accelerator is
synchronized around each block) at this process's intra-op thread count (``Timer`` would otherwise pin 1 thread).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils.benchmark import Timer
from torch.utils.benchmark.utils.timer import timer as clock  # perf_counter after an accelerator sync

Step = Callable[[], Any]
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------- timing
def timed_calls(fn: Step, min_time: float) -> tuple[float, int]:
    """(seconds per call, calls timed) of ``fn``. One warm-up call first; when it took longer than 4 × ``min_time``
    (REM at 224 px on a CPU), or ``min_time`` is 0 (quick mode), it is the measurement (calls timed: 1). Else
    ``Timer.blocked_autorange(min_run_time=min_time)`` measures: the mean over its blocks."""
    t0 = clock()
    fn()
    first = clock() - t0
    if min_time <= 0 or first > 4 * min_time:
        return first, 1
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_time)
    return m.mean, len(m.times) * m.number_per_run


def timed(fn: Step, min_time: float) -> float:
    """Seconds per call of ``fn`` (see :func:`timed_calls`)."""
    return timed_calls(fn, min_time)[0]


def timed_once(fn: Callable[[], T]) -> tuple[T, float]:
    """(``fn()``, its seconds): one call, the accelerator synchronized before each clock read. For work that
    cannot be repeated as it is (a stage run that writes its output and would resume on a second call)."""
    t0 = clock()
    out = fn()
    return out, clock() - t0


def count_flops(fn: Step) -> float:
    """FLOPs of one call of ``fn``, from torch's per-op formulas (conv, matmul, attention; forward and backward,
    as executed). A plain dispatch mode: FlopCounterMode's module hooks break ``torch.autograd.grad`` on leaf
    inputs, which the noise steps use."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    total = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            f = flop_registry.get(func._overloadpacket)
            if f is not None:
                total[0] += f(*args, **kwargs, out_val=out)
            return out

    with Count():
        fn()
    return float(total[0])


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an (n × n) @ (n × n) matrix product: the practical peak of a device without a datasheet."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, 1.0)


# ----------------------------------------------------------------------------------------- device and precision
def device_name(device: torch.device) -> str:
    """The GPU's name, else the CPU's (``platform.processor()``, else the machine type)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a benchmark ran on: device name and type, intra-op threads, torch and Python versions."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def autocast_args(device: torch.device, bf16: bool) -> dict[str, Any]:
    """Keyword arguments of ``torch.autocast``: bf16 when ``bf16``, else a disabled context (fp32)."""
    return {"device_type": device.type, "dtype": torch.bfloat16, "enabled": bf16}


@dataclass(frozen=True)
class Setting:
    """Where and how a benchmark runs: ``device``, bf16 autocast with channels_last (``bf16``), and ``quick``
    (smoke-test sizes and one timed call: checks a script runs, measures nothing)."""

    device: torch.device
    bf16: bool = False
    quick: bool = False

    @property
    def amp(self) -> dict[str, Any]:
        return autocast_args(self.device, self.bf16)

    @property
    def precision(self) -> str:
        return "bf16+cl" if self.bf16 else "fp32"

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on the device, channels_last under bf16 (the fast layout for bf16 convolutions)."""
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.bf16 else module

    def batch(self, gpu: int, cpu: int) -> int:
        """Batch size: 1 in quick mode, else ``gpu`` on CUDA and ``cpu`` elsewhere."""
        return 1 if self.quick else (gpu if self.device.type == "cuda" else cpu)

    def min_time(self, seconds: float) -> float:
        """The ``min_time`` of :func:`timed`: ``seconds``, or 0 in quick mode (the warm-up call alone)."""
        return 0.0 if self.quick else seconds
