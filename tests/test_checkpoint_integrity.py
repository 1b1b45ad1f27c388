"""Checkpoints are checked before they are trusted (Reliability II, item 8): a flipped byte in ``state.pt`` or a
truncated RNG file is refused naming the file, and a deleted ``latest`` pointer resumes from the newest complete
folder instead of silently retraining from step 0."""

import logging
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from uedist.checkpoint import CheckpointError, latest_checkpoint, load_state, restore_rng, save_checkpoint


def _save(root, step):
    state = {"model": {"w": torch.arange(1000, dtype=torch.float32)}, "note": "x"}
    return save_checkpoint(root, step, state, rank=0, barrier=lambda: None)


def _flip_a_tensor_byte(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the tensor storage, the largest member: the zip container stays valid
    f.write_bytes(bytes(data))


def test_a_flipped_byte_in_state_is_refused_naming_the_file(tmp_path):
    path = _save(tmp_path, 10)
    assert torch.equal(load_state(path)["model"]["w"], torch.arange(1000, dtype=torch.float32))
    _flip_a_tensor_byte(path / "state.pt")
    with pytest.raises(CheckpointError, match=r"state\.pt: sha256 differs"):
        load_state(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_rng_file_is_refused(tmp_path, damage):
    path = _save(tmp_path, 10)
    f = path / "rng-rank0.pt"
    f.write_bytes(f.read_bytes()[:40] if damage == "truncate" else b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="rng-rank0.pt"):
        restore_rng(path, 0)


def test_old_checkpoints_without_digests_still_load(tmp_path):
    path = _save(tmp_path, 10)
    (path / "sha256.json").unlink()
    assert load_state(path)["note"] == "x" and restore_rng(path, 0)


def test_a_deleted_latest_pointer_resumes_from_the_newest_complete_folder(tmp_path, caplog):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    (tmp_path / "latest").unlink()
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == newest
    assert "latest is missing" in caplog.text or "missing" in caplog.text


@pytest.mark.slow
def test_a_victim_resumed_from_a_damaged_checkpoint_exits_2(tmp_path, synth_sets):
    args = [
        sys.executable, str(REPO / "launch/victim.py"), "--config", str(REPO / "configs/victim/synthetic.yaml"),
        f"data.train={synth_sets / 'train'}", f"data.test={synth_sets / 'test'}", f"run_root={tmp_path}", "name=v",
        "progress=false", "data.workers=0", "model.width=0.125", "epochs=0", "steps=6", "ckpt_every=5",
    ]  # fmt: skip
    first = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = latest_checkpoint(tmp_path / "v" / "checkpoints")
    _flip_a_tensor_byte(ckpt / "state.pt")
    (tmp_path / "v" / "metrics.json").unlink(missing_ok=True)  # the same command again: it resumes from ckpt
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2, again.stderr[-2000:]
    assert "state.pt: sha256 differs" in again.stderr + again.stdout


def test_a_full_disk_during_a_checkpoint_write_is_disk_full_naming_the_file(tmp_path, monkeypatch):
    """torch.save turns the write's ENOSPC into 'RuntimeError: unexpected pos'; the job must say DiskFull (rc 2)."""
    import os
    import tempfile

    from uedist.io import DiskFull

    real = tempfile.mkstemp

    def full_disk(*a, **kw):  # the temp file beside the target is /dev/full: every write fails with ENOSPC
        fd, name = real(*a, **kw)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.setattr("uedist.io.tempfile.mkstemp", full_disk)
    big = {"model": {"w": torch.zeros(1 << 20)}}  # 4 MiB: more than any buffer before the first write
    with pytest.raises(DiskFull, match=r"rng-rank0\.pt: no space left on device"):
        save_checkpoint(tmp_path, 1, big, rank=0, barrier=lambda: None)


@pytest.mark.parametrize("value", ["abc", "-5", "inf", "nan", "1e30"])
def test_a_bad_collective_timeout_is_a_config_error(monkeypatch, value):
    from uedist.config import ConfigError
    from uedist.dist import TIMEOUT_ENV, collective_timeout

    monkeypatch.setenv(TIMEOUT_ENV, value)
    with pytest.raises(ConfigError, match=TIMEOUT_ENV):
        collective_timeout()


@pytest.mark.parametrize(
    "state",
    [{"step": 3}, {"model": {"weight": "text"}, "step": 3}, {"model": {"nope": torch.zeros(2)}, "step": 3},
     {"model": None, "step": 3}],
    ids=["no-model", "wrong-type", "missing-keys", "none"],
)  # fmt: skip
def test_a_checkpoint_with_missing_keys_or_wrong_types_is_refused_naming_it(tmp_path, state):
    from uedist.engine.train.checkpoints import Checkpointer

    class Acc:
        process_index, num_processes = 0, 1

        def wait_for_everyone(self):
            pass

    save_checkpoint(tmp_path / "checkpoints", 3, state, rank=0, barrier=lambda: None)
    with pytest.raises(CheckpointError, match=r"step-00000003/state\.pt: not a checkpoint of this run"):
        Checkpointer(tmp_path, Acc(), every=0).resume(torch.nn.Linear(2, 1))
