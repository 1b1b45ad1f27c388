"""Pictures a job leaves: an attack's ``grid.png`` (clean | poisoned | noise, a sample per class) and a victim's
``curve.png`` (train loss, train and test accuracy against step), its test accuracy also in TensorBoard."""

from __future__ import annotations

import csv
import json

import numpy as np
from PIL import Image

from uedist.app.stages import stage_main
from uedist.data.images import decode_image
from uedist.data.manifest import load_manifest
from uedist.data.shards import read_shard
from uedist.engine.attacks.base import attack_summary, write_attack_grid
from uedist.engine.train.loop import plot_curve

THUMB, PAD, TITLE = 64, 2, 16  # comparison_grid's tiles, write_image_grid's padding and title band


def _first_per_class(folder):
    """The first image of each label in shard 0, in order met."""
    m, seen = load_manifest(folder), {}
    for s in read_shard(folder, m.shards[0]):
        seen.setdefault(s.label, decode_image(s.data, s.ext, m.image_size))
    return list(seen.values())


def test_an_attack_job_draws_its_grid_and_says_so(synth_sets, tmp_path, capsys):
    args = ["method=random", f"data.train={synth_sets / 'train'}", f"run_root={tmp_path}", "name=rnd"]
    assert stage_main("attack", [*args, "data.workers=0", "progress=false"]) == 0
    run = tmp_path / "rnd"
    grid = Image.open(run / "grid.png")
    classes = len(_first_per_class(synth_sets / "train"))  # 4: one row per class
    assert classes == 4 and (run / "metrics.json").is_file()
    assert grid.size == (3 * (THUMB + PAD) + PAD, TITLE + classes * (THUMB + PAD) + PAD)  # (200, 282)
    a = np.asarray(grid.convert("RGB")).astype(int)
    tile = lambda row, col: a[TITLE + PAD + row * (THUMB + PAD) :][:THUMB, PAD + col * (THUMB + PAD) :][:, :THUMB]  # noqa: E731
    clean0 = np.asarray(Image.fromarray(_first_per_class(synth_sets / "train")[0]).resize((THUMB, THUMB), 0))
    assert np.array_equal(tile(0, 0), clean0)  # column 0 is the clean image, nearest-upscaled
    assert 0 < np.abs(tile(0, 1) - tile(0, 0)).max() <= 8  # the poisoned one, within the ℓ∞ budget 8/255
    noise = tile(0, 2)
    assert noise.min() == 0 and noise.max() == 255  # the noise stretched to the full range
    assert f"{run / 'grid.png'}" in capsys.readouterr().out  # the summary names it


def test_the_grid_shows_an_unpoisoned_sample_as_grey_and_a_bad_set_draws_nothing(synth_sets, tmp_path, caplog):
    out = write_attack_grid(synth_sets / "train", synth_sets / "train", tmp_path / "same.png", classes=2)
    a = np.asarray(Image.open(out).convert("RGB"))
    assert a.shape[:2] == (TITLE + 2 * (THUMB + PAD) + PAD, 3 * (THUMB + PAD) + PAD)
    noise = a[TITLE + PAD : TITLE + PAD + THUMB, PAD + 2 * (THUMB + PAD) :][:, :THUMB]
    assert (noise == 128).all()  # nothing changed: mid-grey
    # a set it cannot read: logged, not fatal (the poisoned set is already written)
    assert write_attack_grid(synth_sets / "train", tmp_path / "absent", tmp_path / "bad.png") is None
    assert "no picture drawn" in caplog.text and not (tmp_path / "bad.png").exists()
    s = {"method": "random", "name": "x", "poisoned": "p", "train": "t", "noise": {}, "timings": {}}
    s["noise"] = {"samples": 1, "linf_max": 1, "l2_mean": 1, "budget": "ℓ∞ 8/255"}
    assert "grid.png" not in attack_summary(s, tmp_path)  # no picture: the summary does not claim one


def test_a_victim_writes_its_curve_plot_and_logs_test_accuracy_to_tensorboard(synth_sets, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [f"data.train={synth_sets / 'train'}", f"data.test={synth_sets / 'test'}", f"run_root={tmp_path}"]
    args += ["name=v", "model.width=0.125", "data.batch_size=32", "data.workers=0", "steps=4", "log_every=2"]
    args += ["eval_every=2", "progress=false", "log_with=tensorboard", "bf16=false", "channels_last=false"]
    assert stage_main("victim", args, default_method="victim") == 0
    run = tmp_path / "v"
    png = Image.open(run / "curve.png")
    assert png.format == "PNG" and png.size[0] > 600 and png.size[1] > 200  # two panels side by side
    assert "curve.png" in capsys.readouterr().out
    curve = list(csv.DictReader((run / "curve.csv").open()))
    assert [r["step"] for r in curve if r.get("test_top1")] == ["2"]  # the evaluation every 2 steps (not at the end)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    top1 = acc.Scalars("test_top1")  # the evaluation at step 2 and the final one at step 4
    assert [e.step for e in top1] == [2, 4]
    assert abs(top1[-1].value - json.loads((run / "metrics.json").read_text())["test_top1"]) < 1e-4
    assert [e.step for e in acc.Scalars("test_top5")] == [4]


def test_plot_curve_draws_the_rows_that_hold_a_key_and_nothing_without_one(tmp_path):
    rows = [{"step": 1, "train_loss": 2.0, "train_acc": 10.0}, {"step": 2, "test_top1": 30.0}]
    rows += [{"step": 3, "train_loss": 1.0, "train_acc": 40.0}]
    panels = {"loss": ["train_loss"], "accuracy (%)": ["train_acc", "test_top1"]}
    assert plot_curve(tmp_path / "c.png", rows, panels) == tmp_path / "c.png"
    assert Image.open(tmp_path / "c.png").format == "PNG"
    assert plot_curve(tmp_path / "none.png", rows, {"x": ["absent"]}) is None and not (tmp_path / "none.png").exists()


def test_report_curves_skip_evaluation_rows(tmp_path):
    """A victim with eval_every > 0 writes evaluation rows whose train_acc is empty: the report's curve plot skips
    them instead of failing."""
    from uedist.app.report import curves_plot

    run = tmp_path / "v"
    run.mkdir()
    (run / "curve.csv").write_text("step,train_loss,train_acc,test_top1\n1,2.0,10.0,\n2,,,30.0\n3,1.5,20.0,\n")
    tags = {"dataset": "syn", "mode": "standard", "victim": "r18", "attack": "clean", "purifier": "none"}
    out = curves_plot([{"kind": "victim", "dir": str(run), "tags": tags}], tmp_path / "curves.png")
    assert out is not None and (tmp_path / "curves.png").stat().st_size > 0
