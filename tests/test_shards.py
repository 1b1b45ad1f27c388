"""Shard sets: deterministic, atomic, resumable builds; verify and read name truncated or altered shards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds

from tests.conftest import REPO, build, run_cli
from uedist.data.manifest import ManifestError, load_manifest
from uedist.data.shards import ShardError, iter_samples, verify_shard_set

SMALL = (
    "synthetic.num_classes=3",
    "synthetic.size=16",
    "synthetic.num_train=90",
    "synthetic.num_test=30",
    "shard_size=20",
)


def _digests(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def test_deterministic_and_complete(tmp_path):
    a = build(tmp_path / "a", *SMALL)
    b = build(tmp_path / "b", *SMALL, "workers=2")  # parallel build, same bytes
    for split in ("train", "test"):
        assert _digests(a / split) == _digests(b / split) and len(_digests(a / split)) > 1
    m = load_manifest(a / "train")
    assert m.num_samples == 90 and sum(m.class_counts) == 90 and m.encoding == "png" and m.lossless
    keys = [s.key for s in iter_samples(a / "train")]
    assert sorted(keys) == [f"{i:08d}" for i in range(90)]  # every key once; shuffled across shards
    labels = {s.label for s in iter_samples(m and a / "train")}
    assert labels == {0, 1, 2}
    assert m.provenance["stage"] == "ingest" and m.provenance["config"]["synthetic"]["num_train"] == 90
    assert not (a / "train" / "_progress").exists()


def test_webdataset_library_reads_our_shards(synth_sets):
    folder = synth_sets / "train"
    m = load_manifest(folder)
    urls = [str(folder / s.name) for s in m.shards]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8")
    ours = {s.key: s.label for s in iter_samples(folder)}
    n = 0
    for sample in ds:
        assert int(sample["cls"]) == ours[sample["__key__"]]
        assert sample["png"].shape == (16, 16, 3)
        n += 1
    assert n == m.num_samples


@pytest.mark.slow
def test_verify_names_truncated_and_altered_shards(tmp_path):
    out = build(tmp_path / "s", *SMALL)
    folder = out / "train"
    assert verify_shard_set(folder, decode=True).ok
    shards = sorted(folder.glob("shard-*.tar"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray(shards[2].read_bytes())
    flipped[700] ^= 0xFF  # altered, same size
    shards[2].write_bytes(bytes(flipped))
    rep = verify_shard_set(folder)
    assert not rep.ok and len(rep.problems) == 2
    assert shards[1].name in rep.problems[0] and "truncated" in rep.problems[0]
    assert shards[2].name in rep.problems[1] and "altered" in rep.problems[1]
    with pytest.raises(ShardError, match=shards[1].name):
        list(iter_samples(folder))
    r = run_cli("shards", "verify", str(folder))
    assert r.returncode == 1 and shards[2].name in r.stderr  # problems are errors: on stderr
    shards[3].unlink()
    assert any("missing" in p for p in verify_shard_set(folder).problems)


@pytest.mark.slow
def test_missing_or_malformed_manifest(tmp_path):
    out = build(tmp_path / "s", *SMALL)
    folder = out / "train"
    man = folder / "manifest.json"
    d = json.loads(man.read_text())
    man.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(folder)
    man.write_text(json.dumps({**d, "num_samples": 5}))
    with pytest.raises(ManifestError, match="shard counts sum to 90"):
        load_manifest(folder)
    bad = dict(d)
    bad["shards"] = [{**d["shards"][0], "name": "../../etc/passwd"}] + d["shards"][1:]
    man.write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="not a plain file name"):
        load_manifest(folder)
    del d["classes"]
    man.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"missing field\(s\) \['classes'\]"):
        load_manifest(folder)
    man.unlink()
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(folder)
    r = run_cli("shards", "inspect", str(folder))
    assert r.returncode == 1 and "manifest.json does not exist" in r.stderr


def test_rebuild_refuses_other_inputs_unless_overwrite(tmp_path):
    out = build(tmp_path / "s", *SMALL)
    before = _digests(out / "train")
    build(tmp_path / "s", *SMALL)  # same command: nothing to do
    assert _digests(out / "train") == before
    with pytest.raises(FileExistsError, match="overwrite=true"):
        build(tmp_path / "s", *SMALL, "seed=1")
    build(tmp_path / "s", *SMALL, "seed=1", "overwrite=true")
    assert _digests(out / "train") != before


@pytest.mark.slow
def test_killed_build_resumes_to_identical_shards(tmp_path):
    """SIGKILL a build mid-way; rerunning the same command completes it with the same bytes as a clean build."""
    args = [
        "source=synthetic",
        "synthetic.num_train=3000",
        "synthetic.num_test=10",
        "synthetic.size=32",
        "shard_size=100",
        "workers=0",
        "splits=[train]",
    ]
    ref = tmp_path / "ref"
    subprocess.run(
        [sys.executable, "-m", "uedist.app.cli", "shards", "build", "--no-progress", f"out={ref}", *args],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "uedist.app.cli", "shards", "build", "--no-progress", f"out={out}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "train" / "_progress"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(progress.glob("*.json"))) < 5:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(progress.glob("*.json")))
    assert 5 <= done_before < 30, "the kill should land mid-build"
    assert not (out / "train" / "manifest.json").exists()
    with pytest.raises(ManifestError, match="rerun the same command"):
        load_manifest(out / "train")
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming, {done_before} of 30 shards" in r.stdout + r.stderr or "resuming" in r.stdout + r.stderr
    assert _digests(out / "train") == _digests(ref / "train")
    assert verify_shard_set(out / "train").ok
    assert not list((out / "train").glob(".*.tmp"))


def test_fast_parser_matches_tarfile_and_falls_back_for_pax(synth_sets):
    import io
    import tarfile

    from uedist.data.shards import _fast_members, _tarfile_members, parse_tar

    m = load_manifest(synth_sets / "train")
    data = (synth_sets / "train" / m.shards[0].name).read_bytes()
    assert list(_fast_members(data, "x")) == list(_tarfile_members(data, "x"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in [("k1.cls", b"2"), ("k1.npy", b"\x93NUMPY"), ("k2.cls", b"0"), ("k2.npy", b"x")]:
            ti = tarfile.TarInfo(name)
            ti.size, ti.pax_headers = len(payload), {"comment": "pax"}
            tar.addfile(ti, io.BytesIO(payload))
    got = [(s.key, s.label, s.data) for s in parse_tar(buf.getvalue(), "pax.tar")]
    assert got == [("k1", 2, b"\x93NUMPY"), ("k2", 0, b"x")]


def test_corrupt_header_named_even_without_verify(synth_sets):
    from uedist.data.shards import parse_tar

    m = load_manifest(synth_sets / "train")
    clean = (synth_sets / "train" / m.shards[0].name).read_bytes()
    data = bytearray(clean)
    data[1] ^= 0x20  # first member's name, covered by the header checksum
    with pytest.raises(ShardError, match="bad.tar: corrupt tar header at byte 0"):
        list(parse_tar(bytes(data), "bad.tar"))
    with pytest.raises(ShardError, match="bad.tar: truncated tar"):
        list(parse_tar(clean[:1024], "bad.tar"))


def test_a_shard_altered_after_a_verified_read_is_still_refused(synth_sets, tmp_path):
    """Shards are hashed once per process while unchanged; an edit in place (new mtime) is verified again."""
    import os
    import shutil

    from uedist.data.manifest import load_manifest
    from uedist.data.shards import ShardError, read_shard

    folder = tmp_path / "s"
    shutil.copytree(synth_sets / "test", folder)
    info = load_manifest(folder).shards[0]
    assert len(list(read_shard(folder, info))) == info.count
    assert len(list(read_shard(folder, info))) == info.count  # the second read reuses the verification
    f = folder / info.name
    data = bytearray(f.read_bytes())
    data[700] ^= 0xFF
    f.write_bytes(bytes(data))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000))  # a distinct mtime even on a coarse clock
    with pytest.raises(ShardError, match="sha256"):
        list(read_shard(folder, info))
