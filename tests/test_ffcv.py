"""FFCV betons: exact pixels/labels/keys against the WebDataset reader, epoch coverage, up-to-date skipping."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ffcv")

from uedist.config import load_config  # noqa: E402
from uedist.data.build import BuildConfig, build_shard_sets  # noqa: E402
from uedist.data.ffcv_io import BETON, convert_to_beton, make_ffcv_loader, sidecar_path  # noqa: E402
from uedist.data.images import decode_image  # noqa: E402
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
        assert b["image"].dtype.is_floating_point is False and b["image"].shape[1:] == (3, 32, 32)
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
