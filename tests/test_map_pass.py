"""The shard map pass: keys, labels and order kept, lossless output, resume by shard, same bytes on 1 or 2 ranks."""

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.test_multiprocess import accelerate_launch
from uedist.data.images import decode_image
from uedist.data.manifest import load_manifest
from uedist.data.shards import iter_samples, verify_shard_set

SCRIPT = str(REPO / "tests/scripts/map_pass_invert.py")


def _shards(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


@pytest.mark.slow
def test_map_pass_single_and_two_ranks(synth_sets, tmp_path):
    src = synth_sets / "train"
    r = subprocess.run(
        [sys.executable, SCRIPT, str(src), str(tmp_path / "one")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "one"
    n_shards = len(load_manifest(src).shards)  # progress=False (a batch job): one log line per shard, no bar
    assert r.stdout.count("map pass rank 0: shard-") == n_shards and f"{n_shards}/{n_shards} shards" in r.stdout
    assert verify_shard_set(out, decode=True).ok
    m_in, m_out = load_manifest(src), load_manifest(out)
    assert m_out.encoding == "png" and m_out.num_samples == m_in.num_samples and m_out.classes == m_in.classes
    assert m_out.provenance["stage"] == "test:invert" and str(src.resolve()) in m_out.provenance["parents"]
    for a, b in zip(iter_samples(src), iter_samples(out)):
        assert (a.key, a.label) == (b.key, b.label)
        assert np.array_equal(255 - decode_image(a.data, a.ext), decode_image(b.data, b.ext))
    r2 = accelerate_launch(SCRIPT, str(src), str(tmp_path / "two"))
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-2000:]
    assert _shards(tmp_path / "two") == _shards(out)  # shard i depends only on input shard i


@pytest.mark.slow
def test_map_pass_resumes_by_shard_and_reuses_finished(synth_sets, tmp_path):
    src, out = synth_sets / "train", tmp_path / "o"
    subprocess.run([sys.executable, SCRIPT, str(src), str(out)], check=True, capture_output=True, timeout=120)
    ref = _shards(out)
    # simulate a kill after 2 shards: drop the manifest and the later shards, re-create their progress records
    from uedist.data.manifest import MANIFEST
    from uedist.data.shards import PROGRESS

    m = load_manifest(out)
    (out / MANIFEST).unlink()
    fp = m.provenance["fingerprint"]
    (out / PROGRESS).mkdir()
    (out / PROGRESS / "fingerprint").write_text(fp)
    import json
    from dataclasses import asdict

    for i, info in enumerate(m.shards):
        if i < 2:
            (out / PROGRESS / f"{info.name}.json").write_text(json.dumps({"fingerprint": fp, "shard": asdict(info)}))
        else:
            (out / info.name).unlink()
    before = {n: (out / n).stat().st_mtime_ns for n in ref if (out / n).exists()}
    r = subprocess.run([sys.executable, SCRIPT, str(src), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "already written" in r.stdout + r.stderr
    assert _shards(out) == ref
    assert all((out / n).stat().st_mtime_ns == t for n, t in before.items())  # finished shards were not rewritten
    r = subprocess.run([sys.executable, SCRIPT, str(src), str(out)], capture_output=True, text=True, timeout=120)
    assert "already complete" in r.stdout + r.stderr


def test_map_pass_refuses_lossy_output(synth_sets, tmp_path):
    from uedist.dist import make_accelerator
    from uedist.engine.map_pass import run_map_pass

    with pytest.raises(ValueError, match="must be lossless"):
        run_map_pass(
            synth_sets / "train",
            tmp_path / "x",
            lambda x, y, k: x,
            accelerator=make_accelerator(),
            stage="t",
            config={},
            encoding="jpg",
        )


def test_a_finished_set_of_other_settings_is_refused_unless_overwrite(synth_sets, tmp_path):
    """Reliability II, item 1: the refusal names what works (no overwrite key the stage lacks); a stage that has
    ``overwrite`` (JCDP) gets it honoured before the check, not after."""
    from uedist.data.manifest import ManifestError
    from uedist.dist import make_accelerator
    from uedist.engine.map_pass import run_map_pass

    acc = make_accelerator()

    def run(config, overwrite=False):
        return run_map_pass(synth_sets / "test", tmp_path / "o", lambda x, y, k: 255 - x, accelerator=acc, stage="t",
                            config=config, overwrite=overwrite, progress=False)  # fmt: skip

    run({"a": 1})
    with pytest.raises(ManifestError, match="another folder .* or delete"):
        run({"a": 2})
    assert run({"a": 2}, overwrite=True).provenance["fingerprint"] != ""
    run({"a": 2})  # now the set of these settings: reused
