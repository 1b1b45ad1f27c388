"""A run folder belongs to one config and one job at a time (Reliability II, items 1 and 2): a rerun under an
existing name with another config is refused before anything is written (config.yaml included), and a second
job, study or shard build into a folder another live process holds is refused naming the holder."""

import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from uedist.io import RunInUse, hold_lock, release_lock

TINY = ["progress=false", "data.workers=0", "surrogate.width=0.125", "noise_steps=1", "eot_samples=1",
        "adv_steps=1", "data.batch_size=16", "final_batch_size=40"]  # fmt: skip


def _sem(synth_sets, root, *over, wait=True):
    args = [sys.executable, str(REPO / "launch/sem.py"), f"data.train={synth_sets / 'train'}",
            f"data.test={synth_sets / 'test'}", "data.build=", f"run_root={root}", "name=r", *TINY, *over]  # fmt: skip
    if not wait:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def test_a_refused_rerun_leaves_the_run_untouched(synth_sets, tmp_path):
    first = _sem(synth_sets, tmp_path, "steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "r"
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and "logs" not in f.parts and f.name != ".lock"}
    again = _sem(synth_sets, tmp_path, "steps=2", "budget=4")
    out = again.stdout + again.stderr
    assert again.returncode == 2, out[-2000:]
    assert "holds a run of another config (differs in budget)" in out and "Traceback" not in out
    assert "resume=false" not in out and "overwrite=true" not in out  # advice that works: another name, or delete
    after = {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and "logs" not in f.parts and f.name != ".lock"}
    assert after == before  # config.yaml, checkpoints, the poisoned set: byte for byte
    same = _sem(synth_sets, tmp_path, "steps=2", "progress=true")  # a runtime-only difference still resumes
    assert same.returncode == 0, same.stderr[-2000:]


def test_a_second_job_under_the_same_name_is_refused_while_the_first_runs(synth_sets, tmp_path):
    a = _sem(synth_sets, tmp_path, "steps=5000", wait=False)  # runs well past the check below
    try:
        lock = tmp_path / "r" / ".lock"
        for _ in range(600):  # until job A holds the run
            if lock.is_file() and lock.read_text().startswith("pid"):
                break
            time.sleep(0.1)
        b = _sem(synth_sets, tmp_path, "steps=5000")
        out = b.stdout + b.stderr
        assert b.returncode == 2, out[-2000:]
        assert f"run {tmp_path / 'r'} is in use by pid {a.pid}" in out
        assert a.poll() is None  # A runs on, untouched
    finally:
        a.kill()
        a.wait()


def test_lock_is_dropped_when_the_holder_dies(tmp_path):
    code = f"from uedist.io import hold_lock; hold_lock({str(tmp_path)!r}, what='run'); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    hold_lock(tmp_path, what="run")  # no stale lock after the holder ended
    release_lock(tmp_path)


@pytest.mark.parametrize("what", ["study", "shard build"])
def test_a_study_or_build_into_a_held_folder_is_refused(tmp_path, what):
    if what == "study":
        folder = tmp_path / "runs" / "s"
        study = str(REPO / "configs/pipeline/cpu_synthetic.yaml")
        args = [sys.executable, str(REPO / "launch/pipeline.py"), "--config", study, f"run_root={tmp_path / 'runs'}",
                "name=s"]  # fmt: skip
    else:
        folder = tmp_path / "sets"
        args = [sys.executable, "-m", "uedist.app.cli", "shards", "build", "source=synthetic", f"out={folder}",
                "synthetic.num_train=40", "synthetic.num_test=8", "synthetic.size=8"]  # fmt: skip
    code = f"from uedist.io import hold_lock; hold_lock({str(folder)!r}, what='x'); import sys; sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if (folder / ".lock").is_file() and (folder / ".lock").read_text().startswith("pid"):
                break
            time.sleep(0.1)
        r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO)
        out = r.stdout + r.stderr
        assert r.returncode == 2, out[-2000:]
        assert f"is in use by pid {holder.pid}" in out and "Traceback" not in out
    finally:
        holder.communicate("", timeout=60)
    with pytest.raises(RunInUse):  # and in-process: a held lock is refused too
        code2 = f"from uedist.io import hold_lock; hold_lock({str(folder)!r}, what='x'); import time; time.sleep(30)"
        p = subprocess.Popen([sys.executable, "-c", code2])
        try:
            for _ in range(300):
                if (folder / ".lock").read_text().startswith(f"pid {p.pid}"):
                    break
                time.sleep(0.1)
            hold_lock(folder, what="x")
        finally:
            p.kill()
            p.wait()


def test_a_full_disk_at_job_start_exits_2_naming_the_file(tmp_path, monkeypatch, capsys):
    import argparse
    import os
    import tempfile

    from uedist.app.jobs import _start
    from uedist.config import load_config
    from uedist.engine.attacks.random_noise import RandomConfig

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    real = tempfile.mkstemp

    def full_disk(*a, **kw):
        fd, name = real(*a, **kw)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr("uedist.io.tempfile.mkstemp", full_disk)
    cfg = load_config(RandomConfig, None, [f"run_root={tmp_path}", "name=full"])
    with pytest.raises(SystemExit) as e:
        _start(cfg, argparse.ArgumentParser(prog="t"), None)
    assert e.value.code == 2
    assert f"{tmp_path / 'full' / 'config.yaml'}: no space left on device" in capsys.readouterr().err
    release_lock(tmp_path / "full")
