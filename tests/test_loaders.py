"""Training stream: fixed step count, exact resume, per-rank streams; map reader: each sample once, in order."""

import pytest
import torch

from uedist.data.loaders import make_map_loader, make_train_loader
from uedist.data.manifest import load_manifest
from uedist.data.shards import ShardError
from uedist.ops.images import normalize, to_uint8, to_unit


def _keys(loader):
    return [b["key"] for b in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_fixed_steps_and_exact_resume(synth_sets, workers):
    folder = synth_sets / "train"
    kw = dict(batch_size=16, num_steps=25, seed=3, num_workers=workers, shuffle_buffer=60)
    full = _keys(make_train_loader(folder, **kw))
    assert len(full) == 25 and all(len(k) == 16 for k in full)  # 400 samples from a 240-sample set: resampled
    for start in (1, 6, 13, 24):
        assert _keys(make_train_loader(folder, start_step=start, **kw)) == full[start:]
    assert _keys(make_train_loader(folder, **{**kw, "seed": 4})) != full


def test_ranks_get_different_streams_of_equal_length(synth_sets):
    folder = synth_sets / "train"
    r0 = _keys(make_train_loader(folder, batch_size=8, num_steps=10, rank=0, world_size=2, num_workers=0))
    r1 = _keys(make_train_loader(folder, batch_size=8, num_steps=10, rank=1, world_size=2, num_workers=0))
    assert len(r0) == len(r1) == 10 and r0 != r1


def test_shuffle_mixes_shards(synth_sets):
    keys = [
        k
        for b in make_train_loader(synth_sets / "train", batch_size=40, num_steps=1, num_workers=0, shuffle_buffer=200)
        for k in b["key"]
    ]
    assert keys != sorted(keys)


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 2)])
def test_map_reader_each_sample_once_in_key_order(synth_sets, world, workers):
    folder = synth_sets / "train"
    m = load_manifest(folder)
    seen, per_shard = [], {}
    for rank in range(world):
        for b in make_map_loader(folder, batch_size=7, rank=rank, world_size=world, num_workers=workers):
            assert b["shard"] % world == rank
            per_shard.setdefault(b["shard"], []).extend(b["key"])
            seen += b["key"]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == m.num_samples
    for shard, keys in per_shard.items():
        assert keys == sorted(keys)


def test_map_reader_subset_of_shards(synth_sets):
    got = {b["shard"] for b in make_map_loader(synth_sets / "train", batch_size=64, shards=[1, 4])}
    assert got == {1, 4}


def test_reading_an_altered_shard_names_it(tmp_path, synth_sets):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(synth_sets / "train", folder)
    m = load_manifest(folder)
    p = folder / m.shards[0].name
    data = bytearray(p.read_bytes())
    data[600] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=m.shards[0].name):
        for _ in make_map_loader(folder, batch_size=8):
            pass


def test_device_normalization():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8).expand(1, 3, 1, 2)
    u = to_unit(x)
    assert u.dtype == torch.float32 and u.max() == 1.0
    n = normalize(u, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.allclose(n[0, :, 0, 0], torch.full((3,), -1.0)) and torch.equal(to_uint8(u), x)


def test_the_stream_does_not_depend_on_the_worker_count(synth_sets):
    """Reliability II, item 3: a run killed with 0 workers and resumed with 2 or 3 reads what it would have read."""
    folder = synth_sets / "train"
    kw = dict(batch_size=16, num_steps=14, seed=5, shuffle_buffer=60)
    ref = _keys(make_train_loader(folder, **kw, num_workers=0))
    for workers in (1, 2, 3):
        assert _keys(make_train_loader(folder, **kw, num_workers=workers)) == ref, workers
    for start, workers in ((5, 2), (6, 3), (7, 0)):  # resumed at a step, with another worker count
        assert _keys(make_train_loader(folder, **kw, num_workers=workers, start_step=start)) == ref[start:]
