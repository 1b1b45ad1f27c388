"""The shape set beyond what tests/test_synthetic.py checks for both generators: resolution-free, other pictures than
the texture set, built as a shard set by the synthetic_shapes source with its own versioned references."""

import numpy as np

from tests.conftest import build
from uedist.data.images import decode_image
from uedist.data.manifest import load_manifest
from uedist.data.shapes import SHAPES_VERSION, shapes_image
from uedist.data.shards import iter_samples
from uedist.data.synthetic import synthetic_image, synthetic_labels

KW = dict(num_classes=10, seed=0, split="train")


def test_same_sample_same_picture_at_any_resolution():
    """Coordinates are resolution-free: the 64 px image, averaged down to 16 px, is the 16 px image (up to the
    edge's anti-aliasing and the independent pixel noise)."""
    small = shapes_image(11, label=4, size=16, **KW).astype(np.float64)
    big = shapes_image(11, label=4, size=64, **KW).astype(np.float64).reshape(16, 4, 16, 4, 3).mean((1, 3))
    assert np.abs(small - big).mean() < 8.0  # /255; another sample differs by far more
    other = shapes_image(12, label=4, size=16, **KW).astype(np.float64)
    assert np.abs(small - other).mean() > 30.0


def test_other_pictures_than_the_texture_set():
    assert not np.array_equal(shapes_image(7, label=3, size=32, **KW), synthetic_image(7, label=3, size=32, **KW))


def test_source_builds_a_versioned_shard_set(tmp_path):
    out = build(
        tmp_path / "s",
        "synthetic_shapes.num_classes=3",
        "synthetic_shapes.size=16",
        "synthetic_shapes.num_train=30",
        "synthetic_shapes.num_test=9",
        "shard_size=10",
        source="synthetic_shapes",
    )
    m = load_manifest(out / "train")
    assert m.num_samples == 30 and m.class_counts == [10, 10, 10] and m.lossless
    assert m.provenance["parents"] == [f"synthetic-shapes-v{SHAPES_VERSION}(num_classes=3, size=16, seed=0)"]
    for s in iter_samples(out / "train"):
        ref = s.extras["src"].decode()
        assert ref.startswith(f"synthetic:shapes-v{SHAPES_VERSION}:train:")  # never mistaken for a texture set's sample
        index = int(ref.rsplit(":", 1)[1])
        assert s.label == synthetic_labels([index], num_classes=3, seed=0, split="train")[0]
        want = shapes_image(index, label=s.label, num_classes=3, size=16, seed=0, split="train")
        assert np.array_equal(decode_image(s.data, s.ext), want)
