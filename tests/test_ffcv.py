"""FFCV betons: exact pixels/labels/keys against the WebDataset reader, epoch coverage, up-to-date skipping; and
FFCV as a training feed (``data.format: ffcv``): ``uedist shards to-ffcv`` and its provenance, the beton checked
against ``data.train``, a victim trained and evaluated from it, resume at epoch ends, the refused combinations."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

from tests.conftest import build  # noqa: E402
from uedist.app.cli import main as cli_main  # noqa: E402
from uedist.app.jobs import run_stage_main  # noqa: E402
from uedist.config import load_config  # noqa: E402
from uedist.data.build import BuildConfig, build_shard_sets  # noqa: E402
from uedist.data.ffcv_io import (  # noqa: E402
    BETON,
    BetonError,
    TrainFeed,
    check_beton,
    convert_to_beton,
    ffcv_epoch_steps,
    make_ffcv_loader,
    sidecar_path,
)
from uedist.data.images import decode_image  # noqa: E402
from uedist.data.manifest import load_manifest  # noqa: E402
from uedist.data.shards import iter_samples  # noqa: E402


def _build(out: Path, *extra: str) -> Path:
    cfg = load_config(
        BuildConfig,
        None,
        [
            f"out={out}",
            "splits=[train]",
            "synthetic.num_train=300",
            "synthetic.size=32",
            "shard_size=100",
            "encoding=png",
            "workers=0",
            *extra,
        ],
    )
    build_shard_sets(cfg, progress=False)
    return out / "train"


def _reference(folder: Path):
    """(keys, labels, images (N, H, W, 3)) through the WebDataset path, manifest order."""
    samples = list(iter_samples(folder))
    images = np.stack([decode_image(s.data, s.ext) for s in samples])
    return [s.key for s in samples], np.array([s.label for s in samples]), images


def _load_all(beton: Path, **kw):
    keys, labels, images = [], [], []
    for b in make_ffcv_loader(beton, batch_size=64, num_workers=2, **kw):
        assert b["image"].dtype == torch.uint8 and b["image"].shape[1] == 3 and b["image"].is_contiguous()
        keys += b["key"]
        labels.append(b["label"].numpy())
        images.append(b["image"].permute(0, 2, 3, 1).numpy())  # (B, H, W, 3)
    return keys, np.concatenate(labels), np.concatenate(images)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    folder = _build(tmp_path_factory.mktemp("ffcv") / "synth")
    return folder, convert_to_beton(folder)


@pytest.mark.slow
def test_sequential_matches_webdataset_exactly(shard_set):
    folder, beton = shard_set
    assert beton == folder / BETON and sidecar_path(beton).is_file()
    ref_keys, ref_labels, ref_images = _reference(folder)
    keys, labels, images = _load_all(beton, order="sequential")
    assert keys == ref_keys  # manifest order, every sample once
    assert labels.dtype == np.int64 and np.array_equal(labels, ref_labels)
    assert images.dtype == np.uint8 and np.array_equal(images, ref_images)  # raw pixels: bit-exact


@pytest.mark.slow
def test_random_order_covers_every_sample_once_per_epoch(shard_set):
    folder, beton = shard_set
    ref_keys, ref_labels, ref_images = _reference(folder)
    loader = make_ffcv_loader(beton, batch_size=64, order="random", seed=3)
    assert len(loader) == 5  # 300 / 64, last batch kept (drop_last=False)
    epochs = []
    for _ in range(2):
        keys = [k for b in loader for k in b["key"]]
        assert sorted(keys) == ref_keys and keys != ref_keys
        epochs.append(keys)
    assert epochs[0] != epochs[1]  # a new permutation each epoch
    # and the samples still travel with their own labels and pixels
    keys, labels, images = _load_all(beton, order="random", seed=1)
    pos = {k: i for i, k in enumerate(ref_keys)}
    idx = np.array([pos[k] for k in keys])
    assert np.array_equal(labels, ref_labels[idx]) and np.array_equal(images, ref_images[idx])


@pytest.mark.slow
def test_reconvert_skips_when_up_to_date_and_redoes_when_changed(tmp_path, shard_set):
    src, _ = shard_set
    folder = tmp_path / "copy"
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("data.beton*"))
    beton = convert_to_beton(folder, num_workers=1)
    stamp = beton.stat().st_mtime_ns, beton.stat().st_ino
    assert convert_to_beton(folder) == beton
    assert (beton.stat().st_mtime_ns, beton.stat().st_ino) == stamp  # untouched

    # same folder, different content (another seed): the shard sha256s change, so the beton is rebuilt
    _build(tmp_path, "synthetic.seed=7", "overwrite=true")
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "train", folder, dirs_exist_ok=True)
    shutil.copy2(src / BETON, beton)  # an old beton + its old sidecar, as after a rebuild of the shards
    shutil.copy2(sidecar_path(src / BETON), sidecar_path(beton))
    convert_to_beton(folder)
    ref_keys, ref_labels, ref_images = _reference(folder)
    keys, labels, images = _load_all(beton, order="sequential")
    assert keys == ref_keys and np.array_equal(labels, ref_labels) and np.array_equal(images, ref_images)
    assert not np.array_equal(images, _reference(src)[2])

    # a beton without its sidecar is not trusted; no temporary files are left behind
    sidecar_path(beton).unlink()
    convert_to_beton(folder, num_workers=1)
    assert sidecar_path(beton).is_file()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


def test_missing_ffcv_gives_install_hint(monkeypatch, shard_set):
    folder, beton = shard_set
    monkeypatch.setitem(sys.modules, "ffcv", None)  # import ffcv -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[ffcv\]"):
        make_ffcv_loader(beton, batch_size=8)
    with pytest.raises(ImportError, match=r"pip install -e \.\[ffcv\]"):
        convert_to_beton(folder, folder / "other.beton")


def test_bad_order_is_an_error(shard_set):
    _, beton = shard_set
    with pytest.raises(ValueError, match="order"):
        make_ffcv_loader(beton, batch_size=8, order="quasi_random")


# ------------------------------------------------------------------------------ FFCV as a training feed (data.format)
@pytest.fixture(scope="module")
def synth_beton(synth_sets, tmp_path_factory):
    """``uedist shards to-ffcv`` of the tests' tiny set (240 train samples, 16 px, 4 classes), written outside the
    shared set's folder."""
    out = tmp_path_factory.mktemp("beton") / "train.beton"
    assert cli_main(["shards", "to-ffcv", str(synth_sets / "train"), "--out", str(out), "--workers", "1"]) == 0
    return out


def _victim(synth_sets, root, name, *extra):
    """A victim run through its stage runner, in this process; returns the exit code."""
    args = [
        f"name={name}",
        f"run_root={root}",
        f"data.train={synth_sets / 'train'}",
        f"data.test={synth_sets / 'test'}",
        "model.width=0.125",
        "data.batch_size=32",  # 240 samples: an FFCV epoch is 7 steps (drop_last)
        "data.workers=0",
        "progress=false",
        "log_every=7",
        *extra,
    ]
    return run_stage_main("victim", args, default_method="victim")


def _weights(run_dir: Path, step: int):
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}" / "state.pt", weights_only=True)["model"]


def test_to_ffcv_writes_the_shard_sets_samples_and_their_provenance(synth_sets, synth_beton):
    folder = synth_sets / "train"
    ref_keys, ref_labels, ref_images = _reference(folder)
    keys, labels, images = _load_all(synth_beton, order="sequential")
    assert keys == ref_keys and np.array_equal(labels, ref_labels) and np.array_equal(images, ref_images)
    side = json.loads(sidecar_path(synth_beton).read_text())
    m = load_manifest(folder)
    assert side["manifest_sha256"] == hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert (side["num_samples"], side["classes"], side["image_size"]) == (240, m.classes, [16, 16])
    assert side["encoding"] == m.encoding and side["beton_bytes"] == synth_beton.stat().st_size
    assert synth_beton.stat().st_mode & 0o777 == 0o644  # readable by colleagues, not mkstemp's 0600
    assert check_beton(folder, synth_beton) == synth_beton
    assert sorted(p.name for p in synth_beton.parent.iterdir()) == ["train.beton", "train.beton.json"]  # no temp


def test_a_missing_beton_or_one_of_another_set_is_refused(synth_sets, synth_beton, tmp_path):
    folder = synth_sets / "train"
    with pytest.raises(BetonError, match=r"no \.beton at .*none\.beton; write it with: uedist shards to-ffcv"):
        check_beton(folder, tmp_path / "none.beton")
    # the same counts, classes and size, other pixels: the manifest and the shards differ
    other = build(
        tmp_path / "other",
        "synthetic.num_classes=4",
        "synthetic.size=16",
        "synthetic.num_train=240",
        "synthetic.seed=5",
        "shard_size=40",
        "splits=[train]",
    )
    with pytest.raises(BetonError, match=r"not written from the shard set .*other/train .*\(manifest_sha256, shards"):
        check_beton(other / "train", synth_beton)
    lone = tmp_path / "lone.beton"  # a beton without its provenance is not trusted
    shutil.copy(synth_beton, lone)
    with pytest.raises(BetonError, match="provenance lone.beton.json is missing"):
        check_beton(folder, lone)


def test_the_ffcv_feed_resumes_at_epoch_ends_only(synth_sets, synth_beton, tmp_path):
    data = SimpleNamespace(train=str(synth_sets / "train"), batch_size=32, workers=1, format="ffcv", beton=synth_beton)
    feed = TrainFeed(data, num_samples=240, seed=3, accelerator=SimpleNamespace(num_processes=1))
    assert feed.epoch_steps == 7 == ffcv_epoch_steps(240, 32) and ffcv_epoch_steps(250, 16, 2) == 7
    assert (feed.ckpt_every(10), feed.ckpt_every(7), feed.ckpt_every(0)) == (14, 7, 0)

    def keys(start):
        p = SimpleNamespace(
            start=start, resumed={"config": {"data": {"format": "ffcv"}}}, ckpt=SimpleNamespace(dir=tmp_path)
        )
        return [b["key"] for b in feed.batches(p, 16, shards=None)()]

    whole = keys(0)
    assert len(whole) == 16 and all(len(k) == 32 for k in whole)
    assert sorted(sum(whole[:7], [])) == sorted(set(sum(whole[:7], [])))  # an epoch: each sample at most once
    assert keys(7) == whole[7:] and keys(14) == whole[14:]  # an epoch end: the same batches, in the same order
    with pytest.raises(BetonError, match="step 10 is mid-epoch .* FFCV resumes at epoch ends only"):
        keys(10)


def test_a_victim_trains_and_evaluates_from_a_beton_and_resumes_exactly(synth_sets, synth_beton, tmp_path):
    ff = ["data.format=ffcv", f"data.beton={synth_beton}", "steps=14", "ckpt_every=3"]  # 3 -> 7: epoch ends
    assert _victim(synth_sets, tmp_path, "ff", *ff) == 0
    m = json.loads((tmp_path / "ff" / "metrics.json").read_text())
    assert m["steps"] == 14 and m["test_samples"] == 80 and math.isfinite(m["final_train_loss"])
    assert sorted(p.name for p in (tmp_path / "ff" / "checkpoints").glob("step-*")) == [
        "step-00000007",
        "step-00000014",
    ]
    # killed after its first epoch: the rerun resumes there and ends with the uninterrupted run's weights
    shutil.copytree(tmp_path / "ff", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "step-00000014")
    (tmp_path / "again" / "metrics.json").unlink()
    (tmp_path / "again" / "checkpoints" / "latest").write_text("step-00000007")
    assert _victim(synth_sets, tmp_path, "again", *ff) == 0
    a, b = _weights(tmp_path / "ff", 14), _weights(tmp_path / "again", 14)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_what_ffcv_cannot_do_is_refused_with_exit_2(synth_sets, synth_beton, tmp_path, capsys):
    assert (
        _victim(synth_sets, tmp_path, "none", "data.format=ffcv", f"data.beton={tmp_path / 'x.beton'}", "steps=2") == 2
    )
    assert "no .beton at" in capsys.readouterr().err
    # a beton of another set than data.train (the test set here)
    bad = [f"data.train={synth_sets / 'test'}", "data.format=ffcv", f"data.beton={synth_beton}", "steps=2"]
    assert _victim(synth_sets, tmp_path, "other", *bad) == 2
    assert "was not written from the shard set" in capsys.readouterr().err
    # a run checkpointed with the shard stream does not continue with FFCV's order (nor the reverse)
    assert _victim(synth_sets, tmp_path, "sh", "steps=14", "ckpt_every=7") == 0
    shutil.rmtree(tmp_path / "sh" / "checkpoints" / "step-00000014")
    (tmp_path / "sh" / "checkpoints" / "latest").write_text("step-00000007")
    assert _victim(synth_sets, tmp_path, "sh", "steps=14", "data.format=ffcv", f"data.beton={synth_beton}") == 2
    assert "checkpointed with data.format=shards" in capsys.readouterr().err
    # EM: its rounds train on sets the job writes, and its noise is indexed by key
    em = ["method=em", f"data.train={synth_sets / 'train'}", f"run_root={tmp_path}", "data.format=ffcv"]
    with pytest.raises(SystemExit) as e:  # refused as the config is read (argparse's exit 2)
        run_stage_main("attack", em)
    assert e.value.code == 2
    assert "data.format=ffcv is not offered for EM" in capsys.readouterr().err


def test_the_sem_surrogate_trains_from_a_beton(synth_sets, synth_beton, tmp_path):
    from uedist.app.stages import get_stage

    st = get_stage("sem", "attack")
    args = [*st.smoke, "steps=8", f"data.train={synth_sets / 'train'}", f"run_root={tmp_path}", "name=sem"]
    assert run_stage_main("attack", [*args, "method=sem", "data.format=ffcv", f"data.beton={synth_beton}"]) == 0
    m = json.loads((tmp_path / "sem" / "metrics.json").read_text())
    assert m["surrogate_curve"][-1]["step"] == 8 and m["noise"]["eps_violations"] == 0
    # an FFCV epoch is 15 steps here: the smoke cadence (2) rounds up to 15, past the end; only the final checkpoint
    assert sorted(p.name for p in (tmp_path / "sem" / "surrogate" / "checkpoints").glob("step-*")) == ["step-00000008"]


@pytest.mark.slow
def test_the_feed_benchmark_runs_in_its_quick_mode(tmp_path):
    """launch/bench/ffcv_train.py --quick (tiny synthetic sets): both feeds, both sizes, with and without the
    augmentation, each a positive rate, in its JSON and its Markdown table."""
    import os
    import subprocess

    from tests.conftest import REPO

    script = REPO / "launch/bench/ffcv_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "ffcv_train.json").read_text())["results"]
    assert {(x["px"], x["feed"], x["augment"]) for x in rows} == {
        (px, f, a) for px in (32, 256) for f in ("shards", "ffcv") for a in (False, True)
    }
    assert all(x["images_per_s"] > 0 for x in rows)
    assert (tmp_path / "ffcv_train.md").read_text().count("| `ffcv` |") == 2
