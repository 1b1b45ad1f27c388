"""Bad input never gets far: each case fails with a uedist error (rc 2 from a job) that names the key, file, shard or
sample; nothing valid is lost; nothing hangs. One row per case of docs/bad_input.md."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch

from tests.conftest import REPO, build, write_image
from tests.test_noise_job import TOY as NOISE_TOY
from uedist.data.loaders import make_map_loader, make_train_loader
from uedist.data.manifest import ManifestError, load_manifest
from uedist.data.shards import ShardError, iter_samples, parse_tar, read_shard, verify_shard_set, write_tar
from uedist.data.sources import SourceError
from uedist.io import atomic_write

SMALL = (
    "synthetic.num_classes=3",
    "synthetic.size=8",
    "synthetic.num_train=48",
    "synthetic.num_test=12",
    "shard_size=16",
    "splits=[train]",
)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 8 px, 48 samples in 3 shards of 16 (never modified: tests copy it)."""
    return build(tmp_path_factory.mktemp("rel") / "s", *SMALL) / "train"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _manifest(folder: Path) -> Dict:
    return json.loads((folder / "manifest.json").read_text())


def _save_manifest(folder: Path, d: Dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(d))


def _rewrite_shard(folder: Path, index: int, edit: Callable[[List], List]) -> str:
    """Rewrite shard ``index`` with ``edit(samples)`` and update the manifest so its sha256/size/count match (a
    consistent, well-formed set that only the label/key checks can refuse). Returns the shard's name."""
    d = _manifest(folder)
    info = d["shards"][index]
    path = folder / info["name"]
    samples = edit(list(parse_tar(path.read_bytes(), info["name"])))
    with open(path, "wb") as f:
        write_tar(f, samples)
    import hashlib

    data = path.read_bytes()
    if len(samples) != info["count"]:
        d["num_samples"] += len(samples) - info["count"]
        d["class_counts"] = []  # no longer known (verify compares them with the labels)
    info.update(count=len(samples), sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    info.update(first_key=samples[0].key, last_key=samples[-1].key)
    _save_manifest(folder, d)
    return info["name"]


def _relabel(label: int) -> Callable[[List], List]:
    def edit(samples: List) -> List:
        samples[3].label = label
        return samples

    return edit


def _drain_train(folder: Path) -> None:
    for _ in make_train_loader(folder, batch_size=8, num_steps=12, num_workers=0, shuffle_buffer=4):
        pass


def _drain_map(folder: Path) -> None:
    for _ in make_map_loader(folder, batch_size=8):
        pass


# ---- item 2: out-of-range labels are refused by every reader, naming the shard and the key -------------------


@pytest.mark.parametrize("label", [17, -1])
def test_out_of_range_label_refused_by_loaders(small_set, tmp_path, label):
    folder = _copy(small_set, tmp_path / "s")
    name = _rewrite_shard(folder, 1, _relabel(label))
    key = next(s.key for i, s in enumerate(read_shard(folder, load_manifest(folder).shards[1])) if i == 3)
    want = rf"{name}: sample {key} has label {label}, outside 0\.\.2"
    for drain in (_drain_train, _drain_map, lambda f: list(iter_samples(f))):
        with pytest.raises(ShardError, match=want):
            drain(folder)
    assert any(f"label {label}" in p for p in verify_shard_set(folder).problems)


def test_manifest_with_fewer_classes_than_labels_refused(small_set, tmp_path):
    folder = _copy(small_set, tmp_path / "s")
    d = _manifest(folder)
    d["classes"], d["class_counts"] = d["classes"][:2], []
    _save_manifest(folder, d)
    with pytest.raises(ShardError, match=r"shard-\d+\.tar: sample \d+ has label 2, outside 0\.\.1 \(the manifest"):
        _drain_train(folder)


# ---- item 4: paths that escape -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../escape", "/abs/run", "a/../../b", "..", "", "."])
def test_run_name_escaping_run_root_refused(tmp_path, name):
    from uedist.config import ConfigError, run_dir

    with pytest.raises(ConfigError, match="name"):
        run_dir(tmp_path / "runs", name)
    assert run_dir(tmp_path / "runs", "study/exp1") == tmp_path / "runs" / "study" / "exp1"


def _ckpt_dir(tmp_path: Path) -> Path:
    from uedist.checkpoint import save_checkpoint

    root = tmp_path / "run" / "checkpoints"
    save_checkpoint(root, 2, {"model": {"w": torch.zeros(2)}}, rank=0, barrier=lambda: None)
    return root


def test_latest_pointer_escaping_the_run_refused(tmp_path):
    from uedist.checkpoint import CheckpointError, latest_checkpoint

    root = _ckpt_dir(tmp_path)
    assert latest_checkpoint(root).name == "step-00000002"
    outside = tmp_path / "x"
    outside.mkdir()
    torch.save({"model": {}}, outside / "state.pt")
    for pointer in ("../../../../x", str(outside), "../../x", "step-00000002/../../../x"):
        (root / "latest").write_text(pointer + "\n")
        with pytest.raises(CheckpointError, match=r"latest names .* outside"):
            latest_checkpoint(root)


def test_refused_checkpoint_names_file_without_suggesting_unsafe_load(tmp_path):
    from uedist.checkpoint import CheckpointError, load_state

    ck = tmp_path / "step-00000001"
    ck.mkdir()
    torch.save({"model": argparse.Namespace(a=1)}, ck / "state.pt")  # an arbitrary object: needs code to rebuild
    with pytest.raises(CheckpointError) as e:
        load_state(ck)
    assert str(ck / "state.pt") in str(e.value) and "not a uedist checkpoint" in str(e.value)
    assert "weights_only=False" not in str(e.value) and "weights_only" not in str(e.value).replace("(", "")
    (ck / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="state.pt: not a uedist checkpoint"):
        load_state(ck)


def _folder_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for c in ("a", "b"):
        write_image(root / "train" / c / "1.png", size=(8, 8), fmt="PNG")
    return root


@pytest.mark.parametrize("what", ["class_folder", "file"])
def test_imagefolder_symlink_out_of_root_refused_or_recorded(tmp_path, what):
    root = _folder_tree(tmp_path)
    outside = tmp_path / "elsewhere"
    write_image(outside / "secret.png", size=(8, 8), fmt="PNG")
    if what == "class_folder":
        (root / "train" / "c").symlink_to(outside, target_is_directory=True)
        link = root / "train" / "c"
    else:
        link = root / "train" / "a" / "2.png"
        link.symlink_to(outside / "secret.png")
    args = (f"folder.root={root}", "folder.size=[8,8]")
    with pytest.raises(SourceError, match=rf"{link}.* leads out of .*{outside}.*follow_symlinks=true"):
        build(tmp_path / "o", *args, "splits=[train]", source="folder")
    out = build(tmp_path / "o", *args, "splits=[train]", "folder.follow_symlinks=true", source="folder")
    srcs = {s.extras["src"].decode() for s in iter_samples(out / "train")}
    assert str((outside / "secret.png").resolve()) in srcs and "train/a/1.png" in srcs


def test_symlink_inside_root_is_fine(tmp_path):
    root = _folder_tree(tmp_path)
    (root / "train" / "a" / "2.png").symlink_to(root / "train" / "b" / "1.png")
    out = build(tmp_path / "o", f"folder.root={root}", "folder.size=[8,8]", "splits=[train]", source="folder")
    assert load_manifest(out / "train").num_samples == 3


# ---- item 5: a crafted shard cannot exhaust memory or block ----------------------------------------------------


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "directory", "bigger"])
def test_shard_that_is_not_its_manifest_size_refused_before_reading(small_set, tmp_path, kind):
    folder = _copy(small_set, tmp_path / "s")
    info = load_manifest(folder).shards[0]
    p = folder / info.name
    p.unlink()
    if kind == "dev_zero":
        p.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        p.mkdir()
    else:
        with open(p, "wb") as f:
            f.truncate(1 << 40)  # sparse 1 TiB: reading it would exhaust memory
    want = "not a regular file" if kind != "bigger" else f"{1 << 40} bytes, manifest says {info.bytes}"
    t0 = time.time()
    for verify in (True, False):
        with pytest.raises(ShardError, match=rf"{info.name}: {want}"):
            list(read_shard(folder, info, verify=verify))
    assert time.time() - t0 < 5


def test_huge_manifest_refused(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    with open(folder / "manifest.json", "wb") as f:
        f.truncate(1 << 40)
    with pytest.raises(ManifestError, match="manifest.json: .* bytes, more than"):
        load_manifest(folder)


# ---- item 6: a stopped peer cannot hang the others -------------------------------------------------------------


def test_collective_timeout_default_and_env(monkeypatch):
    from uedist.dist import DEFAULT_COLLECTIVE_TIMEOUT_S, collective_timeout

    monkeypatch.delenv("UEDIST_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout().total_seconds() == DEFAULT_COLLECTIVE_TIMEOUT_S == 1800
    monkeypatch.setenv("UEDIST_COLLECTIVE_TIMEOUT", "7.5")
    assert collective_timeout().total_seconds() == 7.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv("UEDIST_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ValueError, match="UEDIST_COLLECTIVE_TIMEOUT"):
            collective_timeout()


def test_other_timeouts_are_not_collective_timeouts():
    from uedist.dist import as_collective_timeout

    assert as_collective_timeout(RuntimeError("DataLoader timed out after 5 seconds")) is None  # no process group
    assert as_collective_timeout(ValueError("timeout")) is None


@pytest.mark.slow
@pytest.mark.multiprocess
def test_stopped_peer_times_out_naming_rank_and_collective(tmp_path):
    from tests.test_multiprocess import accelerate_launch

    t0 = time.time()
    script = str(REPO / "tests/scripts/stalled_peer.py")
    r = accelerate_launch(script, "90", timeout=150, env_extra={"UEDIST_COLLECTIVE_TIMEOUT": "3"})
    out = r.stdout + r.stderr
    # rank 0 gives up after 3 s and exits 2; the launcher then needs its own 30 s grace before it SIGKILLs the
    # stopped rank (torch elastic's shutdown), well short of the stopped rank's 90 s
    assert r.returncode != 0 and time.time() - t0 < 60, out[-3000:]
    assert "rank 0: collective barrier timed out after 3 s" in out, out[-3000:]
    assert "(exitcode: 2) local_rank: 0" in out, out[-3000:]


# ---- item 8: manifest sanity, duplicate keys, the jobs' guard ---------------------------------------------------


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(image_size=[0, -5]), r"image_size \[0, -5\] must be two positive ints"),
        (lambda d: d.update(class_counts=[1, 2, 3]), r"class_counts sum to 6, num_samples is 48"),
        (lambda d: d.update(class_counts=[48]), r"class_counts has 1 entries for 3 classes"),
        (lambda d: d.update(class_counts=[50, -2, 0]), r"class_counts .* negative"),
        (lambda d: d["shards"][0].update(count=-1), r"shard-000000.tar: count -1"),
    ],
)
def test_manifest_sanity(small_set, tmp_path, edit, match):
    folder = _copy(small_set, tmp_path / "s")
    d = _manifest(folder)
    edit(d)
    _save_manifest(folder, d)
    with pytest.raises(ManifestError, match=match):
        load_manifest(folder)
    with pytest.raises(ManifestError, match=match):
        verify_shard_set(folder)


def test_verify_compares_class_counts_with_labels(small_set, tmp_path):
    folder = _copy(small_set, tmp_path / "s")
    d = _manifest(folder)
    c = d["class_counts"]
    d["class_counts"] = [c[0] + 1, c[1] - 1, c[2]]  # same sum, wrong per class
    _save_manifest(folder, d)
    rep = verify_shard_set(folder)
    assert not rep.ok and any("class_counts" in p and "labels read" in p for p in rep.problems), rep.problems


def _duplicate_shard0_as_shard1(folder: Path) -> None:
    d = _manifest(folder)
    a, b = d["shards"][0], d["shards"][1]
    shutil.copy(folder / a["name"], folder / b["name"])
    d["num_samples"] += a["count"] - b["count"]
    b.update({k: a[k] for k in ("count", "sha256", "bytes", "first_key", "last_key")})
    d["class_counts"] = []
    _save_manifest(folder, d)


def test_duplicate_keys_refused_naming_key_and_both_shards(small_set, tmp_path):
    folder = _copy(small_set, tmp_path / "s")
    _duplicate_shard0_as_shard1(folder)
    want = r"key ranges of shard-000000.tar \(\d+\.\.\d+\) and shard-000001.tar \(\d+\.\.\d+\) overlap"
    for drain in (_drain_train, _drain_map, verify_shard_set):
        with pytest.raises(ManifestError, match=want):
            drain(folder)


def test_keys_outside_the_manifest_range_refused(small_set, tmp_path):
    folder = _copy(small_set, tmp_path / "s")
    d = _manifest(folder)
    d["shards"][1]["first_key"] = d["shards"][1]["last_key"]  # the manifest lies about shard 1's keys
    _save_manifest(folder, d)
    with pytest.raises(ShardError, match=r"shard-000001.tar: first key \d+, manifest says \d+"):
        list(iter_samples(folder))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s[:4] + [s[3]] + s[4:], r"key \d+ appears twice"),
        (lambda s: s[:4] + [s[1]] + s[4:], r"key \d+ comes after \d+"),  # a copy further on: out of order
    ],
    ids=["adjacent", "later"],
)
def test_duplicate_key_within_a_shard_refused(small_set, tmp_path, edit, match):
    folder = _copy(small_set, tmp_path / "s")
    name = _rewrite_shard(folder, 2, edit)
    for drain in (_drain_train, _drain_map, lambda f: list(iter_samples(f))):
        with pytest.raises(ShardError, match=rf"{name}: {match}"):
            drain(folder)


def _enospc(f) -> None:
    f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises on a full disk: no file name


def test_guard_turns_input_errors_into_rc2_naming_the_file(tmp_path, caplog):
    from uedist.app.jobs import guarded
    from uedist.checkpoint import CheckpointError

    log = logging.getLogger("uedist.test")
    target = tmp_path / "out" / "shard-000000.tar"
    with caplog.at_level(logging.ERROR, logger="uedist.test"):
        assert guarded(lambda: atomic_write(target, _enospc), log) == 2
    assert f"{target}: no space left on device" in caplog.text and not list(target.parent.iterdir())
    for err in (ShardError("x/shard-000003.tar: altered"), ManifestError("m.json: bad"), CheckpointError("c: bad")):
        caplog.clear()

        def boom(err=err):
            raise err

        with caplog.at_level(logging.ERROR, logger="uedist.test"):
            assert guarded(boom, log) == 2
        assert str(err) in caplog.text
    with pytest.raises(ZeroDivisionError):  # a bug stays a traceback
        guarded(lambda: 1 / 0, log)


# ---- jobs end to end: rc 2 and a message naming the culprit --------------------------------------------------

TOY = [*NOISE_TOY, "steps=2"]


def _sem(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "sem.py"), f"run_root={tmp_path / 'runs'}", *TOY, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _corrupt(folder: Path) -> str:
    name = load_manifest(folder).shards[1].name
    data = bytearray((folder / name).read_bytes())
    data[700] ^= 0xFF
    (folder / name).write_bytes(bytes(data))
    return rf"{name}: sha256 .* altered"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["label17", "corrupt_shard", "duplicate_keys"])
def test_jobs_exit_2_naming_the_culprit(synth_sets, tmp_path, case):
    import re

    train = _copy(synth_sets / "train", tmp_path / "train")
    if case == "label17":
        want = rf"{_rewrite_shard(train, 2, _relabel(17))}: sample \d+ has label 17, outside 0\.\.3"
    elif case == "corrupt_shard":
        want = _corrupt(train)
    else:
        _duplicate_shard0_as_shard1(train)
        want = r"key ranges of shard-000000.tar \(\d+\.\.\d+\) and shard-000001.tar \(\d+\.\.\d+\) overlap"
    r = _sem(tmp_path, "name=bad", f"data.train={train}", f"data.test={synth_sets / 'test'}")
    out = r.stdout + r.stderr
    assert r.returncode == 2 and re.search(want, out) and "Traceback" not in out, out[-3000:]
    assert not (tmp_path / "runs" / "bad" / "poisoned" / "manifest.json").exists()


@pytest.mark.slow
def test_job_name_escaping_run_root_exits_2(synth_sets, tmp_path):
    r = _sem(tmp_path, "name=../../escape", f"data.train={synth_sets / 'train'}", f"data.test={synth_sets / 'test'}")
    assert r.returncode == 2 and "name" in r.stderr and "outside run_root" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "escape").exists()


# ---- item 3: every number of a schema is range-checked by the loader ---------------------------------------------


@pytest.mark.parametrize(
    "schema, override, match",
    [
        ("victim", "steps=-1", r"steps=-1: must be >= 0"),
        ("noise", "surrogate.width=0", r"surrogate.width=0.0: must be > 0"),
        ("noise", "surrogate.width=-1", r"surrogate.width=-1.0: must be > 0"),
        ("victim", "model.width=0", r"model.width=0.0: must be > 0"),
        ("noise", "train_size=-1", r"train_size=-1: must be >= 0"),
        ("victim", "optim.milestones=[0.9,0.1]", r"optim.milestones must increase"),
        ("victim", "defense.cutout=-5", r"defense.cutout=-5: must be >= 0"),
        ("victim", "eval_every=-1", r"eval_every=-1: must be >= 0"),
        ("noise", "final_batch_size=0", r"final_batch_size=0: must be > 0"),
        ("victim", "log_every=0", r"log_every=0: must be > 0"),
        ("noise", "crop_pad=-3", r"crop_pad=-3: must be >= 0"),
        ("noise", "budget=.inf", r"budget=inf: must be a finite number"),
        ("victim", "model.name=resnet19", r"model.name: unknown model 'resnet19'; did you mean 'resnet18'\?"),
    ],
)
def test_bad_values_refused_naming_the_key(schema, override, match):
    from uedist.config import ConfigError, load_config
    from uedist.engine.attacks.sem_rem import SEMConfig
    from uedist.engine.train.victim import VictimConfig

    cls = {"victim": VictimConfig, "noise": SEMConfig}[schema]
    with pytest.raises(ConfigError, match=match):
        load_config(cls, None, [override])


@pytest.mark.slow
def test_victim_job_with_negative_steps_exits_2(synth_sets, tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "launch/victim.py"), f"run_root={tmp_path}", "steps=-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "steps=-1: must be >= 0" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "victim").exists()
