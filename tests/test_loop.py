"""The one step loop (uedist.engine.loop.run_steps) in-process, on a linear model: window averages, curve rows at
``log_every`` and at the end, the schedule stepping once per step, checkpoint cadence and resume, the NaN guard
refusing the update, 0-d tensor values, and the tracker's event files."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import pytest
import torch

from uedist.checkpoint import latest_checkpoint, load_state
from uedist.dist import make_accelerator
from uedist.engine.train.checkpoints import NonFiniteLoss, check_finite
from uedist.engine.train.loop import OptimConfig, Tracker, prepare_training, run_steps


@dataclass
class _Cfg:
    seed: int = 0
    lr: float = 0.1
    data: dict = field(default_factory=dict)


def _prepare(tmp_path: Path, acc, *, total: int, every: int, resume: bool = True):
    torch.manual_seed(0)
    return prepare_training(
        torch.nn.Linear(2, 1, bias=False),
        OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant", warmup_steps=0),
        total,
        accelerator=acc,
        ckpt_root=tmp_path,
        seed=0,
        config=_Cfg(),
        ckpt_every=every,
        resume=resume,
    )


def _batches(values: List[float]):
    return [torch.full((1, 2), float(v)) for v in values]


def _step(p, seen: List[int]):
    def one(x: torch.Tensor, step_no: int):
        seen.append(step_no)
        loss = p.ddp(x).sum() ** 2
        check_finite(loss, step_no, accelerator=p.accelerator, ckpt_dir=p.ckpt.dir)
        p.update(loss)
        return {"loss": loss.detach(), "v": float(x[0, 0])}  # a 0-d tensor and a float

    return one


@pytest.fixture(scope="module")
def acc():
    return make_accelerator(cpu=True)


def test_rows_are_window_averages_at_log_every_and_at_total(tmp_path, acc):
    p = _prepare(tmp_path, acc, total=5, every=0)
    seen: List[int] = []
    done = run_steps(
        p,
        _step(p, seen),
        _batches([1, 2, 3, 4, 5]),
        total=5,
        desc="t",
        log_every=2,
        progress=False,
        accelerator=acc,
    )
    assert seen == [1, 2, 3, 4, 5] and done.step == 5
    assert [r["step"] for r in p.curve] == [2, 4, 5]
    assert [r["v"] for r in p.curve] == [1.5, 3.5, 5.0]  # the mean over each window, not the last value
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in p.curve)
    assert all(math.isclose(r["lr"], 0.1) for r in p.curve)
    assert p.sched.last_epoch == 5  # one schedule step per training step


def test_checkpoint_cadence_and_resume_continue_the_steps(tmp_path, acc):
    p = _prepare(tmp_path, acc, total=6, every=4)
    saved: List[int] = []
    run_steps(
        p,
        _step(p, []),
        _batches([1] * 6),
        total=6,
        desc="t",
        log_every=3,
        progress=False,
        accelerator=acc,
        save=lambda step, elapsed: saved.append(step),
    )
    assert saved == [4, 6]
    # with the default save: checkpoints at 4 and 6 hold the weights and the curve so far
    q = _prepare(tmp_path / "b", acc, total=6, every=4)
    run_steps(q, _step(q, []), _batches([1] * 4), total=6, desc="t", log_every=3, progress=False, accelerator=acc)
    path = latest_checkpoint(tmp_path / "b" / "checkpoints")
    state = load_state(path)
    assert state["step"] == 4 and [r["step"] for r in state["curve"]] == [3]
    assert torch.equal(state["model"]["weight"], q.model.weight.detach())
    # resume: the prepared run starts at step 4, the step function sees 5 and 6 only, the curve continues
    r = _prepare(tmp_path / "b", acc, total=6, every=4)
    assert r.start == 4 and torch.equal(r.model.weight.detach(), q.model.weight.detach())
    seen: List[int] = []
    done = run_steps(
        r, _step(r, seen), _batches([1] * 2), total=6, desc="t", log_every=3, progress=False, accelerator=acc
    )
    assert seen == [5, 6] and done.step == 6 and [x["step"] for x in r.curve] == [3, 6]
    assert torch.allclose(r.model.weight, p.model.weight)  # equals the uninterrupted run


def test_a_finished_run_reads_no_batches(tmp_path, acc):
    p = _prepare(tmp_path, acc, total=2, every=0)
    run_steps(p, _step(p, []), _batches([1, 1]), total=2, desc="t", log_every=1, progress=False, accelerator=acc)
    q = _prepare(tmp_path, acc, total=2, every=0)

    def never():
        raise AssertionError("batches made for a finished run")

    assert run_steps(q, _step(q, []), never, total=2, desc="t", log_every=1, progress=False, accelerator=acc).step == 2


def test_non_finite_loss_stops_before_the_update(tmp_path, acc):
    p = _prepare(tmp_path, acc, total=4, every=1)
    w0 = None

    def on_step(step):
        nonlocal w0
        w0 = p.model.weight.detach().clone()

    with pytest.raises(NonFiniteLoss, match="step 3"):
        run_steps(
            p,
            _step(p, []),
            _batches([1, 1, float("nan"), 1]),
            total=4,
            desc="t",
            log_every=1,
            progress=False,
            accelerator=acc,
            on_step=on_step,
        )
    assert torch.equal(p.model.weight.detach(), w0)  # the NaN step changed nothing
    assert load_state(latest_checkpoint(tmp_path / "checkpoints"))["step"] == 2  # the last good one is kept


def test_tracker_writes_the_rows_as_event_files(tmp_path, acc):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    p = _prepare(tmp_path, acc, total=4, every=0)
    tb = tmp_path / "tb"
    tracker = Tracker("tensorboard", tb, acc)
    run_steps(
        p,
        _step(p, []),
        _batches([1, 2, 3, 4]),
        total=4,
        desc="t",
        log_every=2,
        progress=False,
        accelerator=acc,
        tracker=tracker,
    )
    tracker.log({"extra": 7.0}, 4)  # a stage may log after the loop (EM's round error): the writer reopens
    tracker.close()
    scalars = {}
    for f in sorted(tb.glob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f))
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
    assert [s for s, _ in scalars["v"]] == [2, 4] and [v for _, v in scalars["v"]] == [1.5, 3.5]
    assert scalars["extra"] == [(4, 7.0)] and "lr" in scalars
    with pytest.raises(Exception, match="log_with"):
        Tracker("wandb", tb, acc)


def test_a_resume_mid_window_writes_the_rows_of_an_uninterrupted_run(tmp_path, acc):
    """Checkpoints at 3 and 6 fall inside the log windows of 4 steps: the checkpoint carries the open window's sums,
    so after a resume at 6 the row at 8 averages steps 5-8 (the uninterrupted run's row), not only 7 and 8."""
    values = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    p = _prepare(tmp_path / "a", acc, total=10, every=3)
    run_steps(p, _step(p, []), _batches(values), total=10, desc="t", log_every=4, progress=False, accelerator=acc)
    assert [(r["step"], r["v"]) for r in p.curve] == [(4, 2.5), (8, 6.5), (10, 9.5)]
    q = _prepare(tmp_path / "b", acc, total=10, every=3)
    run_steps(q, _step(q, []), _batches(values[:6]), total=10, desc="t", log_every=4, progress=False, accelerator=acc)
    state = load_state(latest_checkpoint(tmp_path / "b" / "checkpoints"))
    assert state["step"] == 6 and state["curve_window"]["n"] == 2 and state["curve_window"]["sums"]["v"] == 11.0
    r = _prepare(tmp_path / "b", acc, total=10, every=3)
    assert r.start == 6
    run_steps(r, _step(r, []), _batches(values[6:]), total=10, desc="t", log_every=4, progress=False, accelerator=acc)
    assert [(x["step"], x["v"]) for x in r.curve] == [(4, 2.5), (8, 6.5), (10, 9.5)]
    assert [x["loss"] for x in r.curve] == pytest.approx([x["loss"] for x in p.curve])
    # a checkpoint from before windows were saved (none in it): the first row averages the steps since the resume
    s = _prepare(tmp_path / "b", acc, total=10, every=0)
    s.start, s.curve, s.resumed = 6, [], {}
    run_steps(s, _step(s, []), _batches(values[6:]), total=10, desc="t", log_every=4, progress=False, accelerator=acc)
    assert [(x["step"], x["v"]) for x in s.curve] == [(8, 7.5), (10, 9.5)]
