"""The step-based training loop's shared parts (docs/architecture.md, "The training loop"): optimizer and schedule from
config, the prepared (resumed) run, CSV curves and their plot, a progress bar, the step loop. Resume, checkpoints and
the non-finite-loss guard: :mod:`uedist.engine.train.checkpoints`.

Victim, surrogate (REM/SEM), D-VAE and DDPM training all use these; each supplies its own step function.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple

import torch

from uedist.config import require
from uedist.dist import get_logger
from uedist.engine.train.checkpoints import Checkpointer, check_finite_params, config_state, data_digests, sync_buffers
from uedist.io import atomic_open, atomic_write_bytes

log = get_logger(__name__)


@dataclass
class OptimConfig:
    """SGD with a step or cosine schedule (the reference settings of every paper here)."""

    lr: float = 0.1  # for the global batch
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])  # step schedule: fractions of the run
    gamma: float = 0.1
    warmup_steps: int = 0

    def validate(self) -> None:
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(all(0 < m < 1 for m in self.milestones), f"milestones are fractions in (0, 1), got {self.milestones}")
        require(
            all(a < b for a, b in zip(self.milestones, self.milestones[1:])),
            f"milestones must increase, got {self.milestones}",
        )


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR multiplier: linear warmup, then cosine to 0, ×gamma at each milestone, or constant."""
    marks = sorted(round(m * total_steps) for m in cfg.milestones)

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m for m in marks)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def write_curve(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Write training-curve rows as CSV atomically (the union of keys as columns)."""
    if not rows:
        return
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with atomic_open(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def plot_curve(path: Path, rows: Sequence[Dict[str, Any]], panels: Dict[str, Sequence[str]]) -> Optional[Path]:
    """A PNG of curve rows against ``step`` (matplotlib, Agg), atomically: one panel per ``{y label: [keys]}``, one
    line per key through the rows that hold it (an evaluation row holds only its own keys; a key in fewer than
    three rows is drawn as points). None, and nothing written, when no row holds any of the keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = {k: [(r["step"], float(r[k])) for r in rows if r.get(k) is not None] for ks in panels.values() for k in ks}
    if not any(pts.values()):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for ax, (label, keys) in zip(axes[0], panels.items()):
        for k in (k for k in keys if pts[k]):
            ax.plot(*zip(*pts[k]), label=k, lw=1, marker="o" if len(pts[k]) < 3 else None)
        ax.set(xlabel="step", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


@dataclass
class Prepared:
    """Everything a step-based loop needs, resumed: the bare model (eval, checkpoints), its DDP wrapper (training),
    optimizer, schedule, this rank's generator, the checkpointer, and where the run stands."""

    model: torch.nn.Module
    ddp: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    gen: torch.Generator
    ckpt: "Checkpointer"
    start: int
    curve: List[Dict[str, Any]]
    elapsed: float  # training seconds before this process started
    config: Any  # the run's config (a schema dataclass): saved in full with every checkpoint, guarded by identity
    accelerator: Any = None
    # The backend (DDP through Accelerate unless set, e.g. DeepSpeed ZeRO in uedist.engine.train.zero):
    update_fn: Optional[Callable[[torch.Tensor, float], None]] = None  # backward + (clipped) optimizer step
    save_fn: Optional[Callable[[int, float, Dict[str, Any]], None]] = None  # collective checkpoint
    wrapper: str = ""  # what trains the model, for metrics ("DistributedDataParallel", "DeepSpeedEngine(ZeRO-2)")
    # The inner loops' generator (PGD starts, δ_r, EOT draws): on the device, so they draw there; ``gen`` itself
    # when the device is the CPU (the same stream as before), else its own seeded device generator, checkpointed.
    device_gen: Optional[torch.Generator] = None
    resumed: Dict[str, Any] = field(default_factory=dict)  # the checkpoint resumed from (a stage's own extra state)
    # The open curve window (the steps since the last row): {"step", "n", "sums"}, saved with every checkpoint so
    # that a run resumed mid-window writes the row an uninterrupted run writes (run_steps keeps it current).
    window: Dict[str, Any] = field(default_factory=dict)

    def update(self, loss: torch.Tensor, *, clip: float = 0.0) -> None:
        """Backward and one optimizer step, gradients clipped to norm ``clip`` (0 = off), on this backend."""
        if self.update_fn is not None:
            return self.update_fn(loss, clip)
        self.opt.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if clip:
            self.accelerator.clip_grad_norm_(self.ddp.parameters(), clip)
        self.opt.step()


def prepare_training(
    model: torch.nn.Module,
    optim: OptimConfig,
    total_steps: int,
    *,
    accelerator: Any,
    ckpt_root: Path,
    seed: int,
    config: Any,
    ckpt_every: int,
    resume: bool = True,
    channels_last: bool = False,
    gen_name: str = "augment",
    make_opt: Optional[Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]] = None,
) -> Prepared:
    """Move ``model`` to the device, build SGD (or ``make_opt(params)``, e.g. Adam) and the schedule of ``optim``,
    seed this rank's generator, resume the newest checkpoint under ``ckpt_root`` (by default) and wrap for DDP.
    Build the model under the same seed on every rank (DDP also broadcasts rank 0's weights)."""
    model = model.to(accelerator.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_opt(model.parameters()) if make_opt is not None else make_optimizer(model.parameters(), optim)
    sched = make_scheduler(opt, optim, max(total_steps, 1))
    gen = torch.Generator().manual_seed(seed * 1000 + accelerator.process_index)
    gens = {gen_name: gen}
    device_gen = gen
    if accelerator.device.type != "cpu":
        device_gen = torch.Generator(device=accelerator.device).manual_seed(seed * 1000 + accelerator.process_index)
        gens[f"{gen_name}_device"] = device_gen
    ckpt = Checkpointer(ckpt_root, accelerator, every=ckpt_every, gens=gens, data=data_digests(config))
    state = ckpt.resume(model, opt, sched, config=config) if resume else None
    ddp, opt = accelerator.prepare(model, opt)
    return Prepared(
        model,
        ddp,
        opt,
        sched,
        gen,
        ckpt,
        state["step"] if state else 0,
        list(state.get("curve", [])) if state else [],
        float(state.get("elapsed", 0.0)) if state else 0.0,
        config,
        accelerator=accelerator,
        wrapper=type(ddp).__name__,
        resumed=state or {},
        device_gen=device_gen,
    )


def train_batches(
    data: Any, p: Prepared, *, total: int, seed: int, accelerator: Any, src: str = "", start: int = -1
) -> Any:
    """This rank's training batches for steps ``start + 1 .. total`` (default ``p.start``) of the set ``src``
    (default ``data.train``), read with the ``data`` section's global batch size (split evenly across ranks),
    workers and shuffle buffer: exactly what an uninterrupted run would have read."""
    from uedist.data.loaders import make_train_loader

    world = accelerator.num_processes
    if data.batch_size % world:
        raise ValueError(f"data.batch_size {data.batch_size} is not divisible by {world} processes")
    return make_train_loader(
        src or data.train,
        batch_size=data.batch_size // world,
        num_steps=total,
        seed=seed,
        rank=accelerator.process_index,
        world_size=world,
        num_workers=data.workers,
        shuffle_buffer=data.shuffle_buffer,
        start_step=p.start if start < 0 else start,
        pin_memory=accelerator.device.type == "cuda",
    )


def save_training(p: Prepared, step: int, elapsed: float, **extra: Any) -> None:
    """Collective checkpoint of a prepared run (buffers synced from rank 0, weights checked finite first; or the
    backend's ``save_fn``)."""
    if p.window.get("n"):
        extra = {**extra, "curve_window": p.window}
    if p.save_fn is not None:
        return p.save_fn(step, elapsed, extra)
    sync_buffers(p.model, p.ckpt.acc)
    check_finite_params(p.model, step, p.ckpt.dir)
    p.ckpt.save(
        step,
        {
            "model": p.model.state_dict(),
            "optimizer": p.opt.state_dict(),
            "scheduler": p.sched.state_dict(),
            "curve": p.curve,
            "elapsed": elapsed,
            **config_state(p.config),
            **extra,
        },
    )


def progress_bar(total: int, initial: int, *, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=not enabled)


def report_row(bar: Any, row: Dict[str, float], total: int, *, desc: str, log_lines: bool) -> None:
    """Show a new curve row: on the progress bar, or, in batch jobs run with ``progress=false`` (``log_lines``: the
    main process of such a run), as one log line, so a SLURM log still shows how far the run is and how it goes."""
    values = {k: v for k, v in row.items() if k != "step"}
    if not bar.disable:
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k != "lr"})
    elif log_lines:
        log.info("%s step %d/%d: %s", desc, row["step"], total, " ".join(f"{k} {v:.4g}" for k, v in values.items()))


class Tracker:
    """Optional TensorBoard scalars (``log_with="tensorboard"``): through the accelerator's trackers when it was
    made with ``log_with``, else a ``SummaryWriter`` on the main process writing to ``log_dir``. Off: no-ops."""

    def __init__(self, log_with: str, log_dir: Path, accelerator: Any) -> None:
        require(log_with in ("", "tensorboard"), f"log_with is '' or 'tensorboard', got {log_with!r}")
        self.acc, self.writer = accelerator, None
        self.via_acc = bool(log_with) and bool(getattr(accelerator, "trackers", None))
        if log_with and not self.via_acc and accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def log(self, row: Dict[str, float], step: int) -> None:
        """One curve row (every value but ``step``) as scalars at ``step``."""
        values = {k: float(v) for k, v in row.items() if k != "step"}
        if self.via_acc:
            self.acc.log(values, step=step)
        elif self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def resumed_window(p: Prepared) -> Tuple[int, Dict[str, Any]]:
    """The curve window the resumed checkpoint left open: (steps in it, their sums), so the first row after a
    resume averages exactly the steps since the row before (as an uninterrupted run's does); (0, {}) when none
    (a fresh run, a checkpoint at a row, or one written before windows were saved: then the first row averages
    the steps since the resume)."""
    w = p.resumed.get("curve_window") or {}
    if not w.get("n") or w.get("step") != p.start:
        return 0, {}
    return int(w["n"]), {k: float(v) for k, v in w["sums"].items()}


@dataclass
class StepsDone:
    """What :func:`run_steps` leaves: the last step, training seconds across resumes, and this process's seconds."""

    step: int
    train_time: float
    wall: float


def run_steps(
    p: Prepared,
    step_fn: Callable[[Any, int], Dict[str, float]],
    batches: Any,
    *,
    total: int,
    desc: str,
    log_every: int,
    progress: bool,
    accelerator: Any,
    tracker: Optional[Tracker] = None,
    on_step: Optional[Callable[[int], Optional[Dict[str, float]]]] = None,
    extra_state: Optional[Callable[[], Dict[str, Any]]] = None,
    save: Optional[Callable[[int, float], None]] = None,
) -> StepsDone:
    """The one step loop: for each batch, ``step_fn(batch, step_no)`` (1-based; it does forward, ``check_finite``,
    backward and the optimizer update) returns floats or 0-d tensors (not synchronized with the device until a
    row is due) that are averaged over a window (the steps since the last row; a checkpoint inside one carries its
    sums, so a resumed run writes the rows an uninterrupted one writes); a curve row
    ``{step, lr, <keys>}`` is appended to ``p.curve`` every ``log_every`` steps and at ``total``, shown by
    :func:`report_row` and sent to ``tracker``; ``p.sched`` steps once per step; ``on_step(step)`` may return an
    extra row (e.g. an evaluation); checkpoints at ``p.ckpt.due`` through ``save(step, elapsed)`` (default
    :func:`save_training` with ``extra_state()``). ``batches``: an iterable, or a zero-argument callable making
    one, called only if the run is not finished (``p.start < total``)."""
    bar = progress_bar(total, p.start, desc=desc, enabled=progress and accelerator.is_main_process)
    tracker = tracker or Tracker("", Path("."), accelerator)
    save = save or (lambda s, e: save_training(p, s, e, **(extra_state() if extra_state else {})))
    t0, step = time.time(), p.start
    n, sums = resumed_window(p)
    if p.start < total:
        for batch in batches() if callable(batches) else batches:
            values = step_fn(batch, step + 1)
            step += 1
            p.sched.step()
            n, sums = n + 1, {k: sums.get(k, 0.0) + v for k, v in values.items()}  # 0-d tensors stay on the device
            bar.update(1)
            rows = []
            if step % log_every == 0 or step == total:
                means = {k: float(v / n) for k, v in sums.items()}
                rows.append({"step": step, "lr": p.sched.get_last_lr()[0], **means})
                report_row(bar, rows[-1], total, desc=desc, log_lines=not progress and accelerator.is_main_process)
                n, sums = 0, {}
            extra = on_step(step) if on_step is not None else None
            rows += [{"step": step, **extra}] if extra else []
            for row in rows:
                p.curve.append(row)
                tracker.log(row, step)
            if p.ckpt.due(step, total):
                p.window = {"step": step, "n": n, "sums": {k: float(v) for k, v in sums.items()}} if n else {}
                save(step, p.elapsed + time.time() - t0)
    bar.close()
    tracker.close()
    return StepsDone(step, p.elapsed + time.time() - t0, time.time() - t0)
