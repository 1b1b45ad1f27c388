"""Victim training: real 2-process DDP, kill/resume equality, bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, build
from tests.test_multiprocess import accelerate_launch

VICTIM = str(REPO / "launch/victim.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("victim_data")
    return build(
        out,
        "synthetic.num_classes=4",
        "synthetic.size=16",
        "synthetic.num_train=320",
        "synthetic.num_test=100",
        "shard_size=40",
    )


def _args(data, run_root, name, *extra):
    return [
        f"name={name}",
        f"run_root={run_root}",
        f"data.train={data / 'train'}",
        f"data.test={data / 'test'}",
        "model.width=0.125",
        "data.batch_size=32",
        "data.workers=0",
        "progress=false",
        "log_every=5",
        *extra,
    ]


def _run(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, VICTIM, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def _final_weights(run_dir: Path):
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    return torch.load(ckpts[-1] / "state.pt", weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_in_sync_and_eval_counts_once(data, tmp_path):
    r = accelerate_launch(VICTIM, *_args(data, tmp_path, "ddp", "steps=12", "data.workers=1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["wrapper"] == "DistributedDataParallel"
    assert m["ranks_in_sync"] is True
    assert m["test_samples"] == 100  # split by shard across ranks, summed: each test image exactly once
    assert (tmp_path / "ddp" / "logs" / "rank1.log").is_file()


@pytest.mark.slow
def test_kill_and_resume_gives_identical_weights(data, tmp_path):
    args = ["steps=40", "ckpt_every=10", "adv.enabled=true", "adv.steps=2", "adv.step_size=2", "defense.mixup=1.0"]
    ref = _run(_args(data, tmp_path, "ref", *args))
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = [sys.executable, VICTIM, *_args(data, tmp_path, "killed", *args)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.is_file() and latest.read_text().strip() >= "step-00000020"):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists(), "the kill should land mid-training"
    again = _run(_args(data, tmp_path, "killed", *args))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    a, b = _final_weights(tmp_path / "ref"), _final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert ma["test_top1"] == mb["test_top1"] and ma["per_class_top1"] == mb["per_class_top1"]


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    # lr 0.1 for 10 steps, then x1e35 (a step schedule with a huge gamma): diverges right after step 10
    r = _run(
        _args(
            data,
            tmp_path,
            "nan",
            "steps=20",
            "ckpt_every=5",
            "optim.schedule=step",
            "optim.milestones=[0.5]",
            "optim.gamma=1e35",
        )
    )
    assert r.returncode == 3, r.stderr[-2000:]
    assert "loss is nan" in r.stdout + r.stderr or "loss is inf" in r.stdout + r.stderr
    latest = (tmp_path / "nan" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-00000010" and "Last good checkpoint" in r.stdout + r.stderr
    state = torch.load(tmp_path / "nan" / "checkpoints" / latest / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_bad_input_errors(data, tmp_path):
    other = build(
        tmp_path / "other",
        "synthetic.num_classes=3",
        "synthetic.size=16",
        "synthetic.num_train=30",
        "synthetic.num_test=30",
        "splits=[test]",
    )
    r = _run(_args(data, tmp_path, "x", "steps=2") + [f"data.test={other / 'test'}"])
    assert r.returncode == 2 and "class lists differ (4 vs 3 classes" in r.stdout + r.stderr
    r = _run(_args(data, tmp_path, "y", "steps=2", "model.name=resnet19"))
    assert r.returncode != 0 and "unknown model 'resnet19'; did you mean 'resnet18'?" in r.stderr
    r = _run(_args(data, tmp_path, "z", "steps=2") + [f"data.train={tmp_path / 'nope'}"])
    assert r.returncode != 0 and "manifest.json does not exist" in r.stderr
    r = _run(_args(data, tmp_path, "w", "steps=2", "epochs=3"))
    assert r.returncode != 0 and "set exactly one of steps or epochs" in r.stderr


@pytest.mark.slow
def test_rebuilt_training_set_refuses_old_checkpoints(tmp_path):
    """Checkpoints record their data's content digest: after the training set is rebuilt in place (e.g. by a newer
    synthetic generator) the run refuses to resume a model trained on the old pictures."""
    args = (
        "synthetic.num_classes=4",
        "synthetic.size=16",
        "synthetic.num_train=80",
        "synthetic.num_test=40",
        "shard_size=40",
    )
    sets = build(tmp_path / "sets", *args)
    r = _run(_args(sets, tmp_path, "v", "steps=2", "ckpt_every=2"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(_args(sets, tmp_path, "v", "steps=2", "ckpt_every=2"))  # same data: resumes (nothing left to do)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-2000:]
    build(tmp_path / "sets", *args, "synthetic.seed=1", "overwrite=true")
    r = _run(_args(sets, tmp_path, "v", "steps=2", "ckpt_every=2"))
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "was trained on other data" in out and "data.train" in out
    assert "Traceback" not in r.stderr


def test_report_row_bar_or_log_line():
    """A curve row shows on the bar when there is one; in a batch job (bar off) the main process logs it instead."""
    import io
    import logging

    from uedist.engine.train.loop import progress_bar, report_row

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("uedist.engine.train.loop")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        row = {"step": 4, "lr": 0.05, "train_loss": 1.23456, "train_acc": 50.0}
        bar = progress_bar(10, 0, desc="x", enabled=True)
        bar.fp = io.StringIO()
        report_row(bar, row, 10, desc="victim", log_lines=True)
        assert bar.postfix == "train_loss=1.235, train_acc=50" and not seen
        off = progress_bar(10, 0, desc="x", enabled=False)
        report_row(off, row, 10, desc="victim", log_lines=False)  # another rank: silent
        assert not seen
        report_row(off, row, 10, desc="victim", log_lines=True)
        assert seen == ["victim step 4/10: lr 0.05 train_loss 1.235 train_acc 50"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.slow
def test_log_with_tensorboard_writes_the_curve_as_event_files(synth_sets, tmp_path):
    """log_with=tensorboard: the curve rows land in runs/<name>/tb as scalars at their steps; off: no tb folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from uedist.app.jobs import run_stage_main

    common = [
        f"data.train={synth_sets / 'train'}",
        f"data.test={synth_sets / 'test'}",
        f"run_root={tmp_path}",
        "model.width=0.125",
        "data.batch_size=32",
        "data.workers=0",
        "epochs=0",
        "steps=4",
        "log_every=2",
        "progress=false",
    ]
    assert run_stage_main("victim", [*common, "name=tb", "log_with=tensorboard"], default_method="victim") == 0
    assert run_stage_main("victim", [*common, "name=plain"], default_method="victim") == 0
    assert not (tmp_path / "plain" / "tb").exists()
    acc = EventAccumulator(str(tmp_path / "tb" / "tb"))
    acc.Reload()
    loss = acc.Scalars("train_loss")
    curve = list(csv.DictReader((tmp_path / "tb" / "curve.csv").open()))
    assert [e.step for e in loss] == [int(r["step"]) for r in curve if r.get("train_loss")] == [2, 4]
    assert [round(e.value, 4) for e in loss] == [round(float(r["train_loss"]), 4) for r in curve if r.get("train_loss")]


@pytest.mark.parametrize("bn_mode, per_step", [("eval", 1), ("train", 3)])
def test_adversarial_training_crafts_with_batchnorm_in_eval_mode_by_default(data, tmp_path, bn_mode, per_step):
    """BatchNorm counts one batch per step when PGD crafts in eval mode (the SEM/REM reference, our default),
    1 + K_a when it crafts in train mode (the option)."""
    from uedist.engine.train.victim import AdvConfig

    assert AdvConfig().bn_mode == "eval"
    extra = ["steps=4", "ckpt_every=4", "adv.enabled=true", "adv.steps=2", "adv.eps=4", "adv.step_size=2"]
    r = _run(_args(data, tmp_path, bn_mode, *extra, f"adv.bn_mode={bn_mode}"))
    assert r.returncode == 0, r.stderr[-3000:]
    tracked = [v for k, v in _final_weights(tmp_path / bn_mode).items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 4 * per_step for v in tracked)
