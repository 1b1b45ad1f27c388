"""No small file may size a huge allocation (issue: Reliability II, "memory bombs"): every bound is checked from a
header or a key before anything is allocated, and the refusal names the file."""

import io
import pickle
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from uedist.data.images import CorruptImageError, load_rgb, to_canonical
from uedist.data.sources.base import SourceError
from uedist.data.sources.cifar import load_cifar_batch


def _png_header_only(width: int, height: int, *, bit_depth: int, color_type: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` and whose one IDAT holds a few compressed zero rows: a
    small file that asks for a huge decode (the probe's 380 KB 16-bit 14,000² PNG, in a few hundred bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "case, data",
    [
        ("16-bit 14000x14000", _png_header_only(14_000, 14_000, bit_depth=16, color_type=0)),
        ("RGBA 12000x12000", _png_header_only(12_000, 12_000, bit_depth=8, color_type=6)),
        ("grey 1x10^7 strip", _png_header_only(10_000_000, 1, bit_depth=8, color_type=0)),
    ],
)
def test_small_png_claiming_a_huge_image_is_refused_before_decoding(case, data):
    assert len(data) < 1_000
    tracemalloc.start()
    try:
        with pytest.raises(CorruptImageError, match="bomb_png") as e:
            load_rgb(data, "bomb_png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "GiB to decode" in str(e.value) or "decompression bomb" in str(e.value), case
    assert peak < 50 << 20, f"{case}: {peak / 2**20:.0f} MiB allocated before refusing"


def test_a_real_16_bit_image_still_decodes():
    a = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    rgb, fmt = load_rgb(buf.getvalue(), "ok16")
    assert fmt == "PNG" and rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    expect = np.clip(np.round(a.astype(np.float64) / 65535 * 255), 0, 255).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - expect.astype(int)).max() <= 1  # float32 rescale: at most one level


def test_resize_of_an_extreme_strip_never_builds_the_whole_scaled_strip():
    strip = np.random.default_rng(0).integers(0, 256, (1, 2_000_000, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        out = to_canonical(strip, (32, 32))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (32, 32, 3)
    # the scale-then-crop path would build a 32 x 64,000,000 RGB image (6 GB); the centre box stays small
    assert peak < 200 << 20, f"{peak / 2**20:.0f} MiB"


def test_ordinary_resize_is_unchanged_by_the_bound():
    img = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    out = to_canonical(img, (64, 64))
    pil = Image.fromarray(img).resize((64, 96), Image.BICUBIC).crop((0, 16, 64, 80))
    assert np.array_equal(out, np.asarray(pil))


def test_cifar_pickle_asking_bytearray_of_a_size_is_refused(tmp_path):
    # GLOBAL builtins.bytearray; LONG1 10**13; TUPLE1; REDUCE; STOP: a 40-byte file asking for 10 TB
    n = (10**13).to_bytes(6, "little")
    blob = b"\x80\x02cbuiltins\nbytearray\n\x8a\x06" + n + b"\x85R."
    f = tmp_path / "data_batch_1"
    f.write_bytes(blob)
    with pytest.raises(SourceError, match="data_batch_1"):
        load_cifar_batch(f)


def test_cifar_pickle_with_bytearray_of_data_still_loads(tmp_path):
    d = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"extra": bytearray(b"abc")}
    f = tmp_path / "data_batch_1"
    f.write_bytes(pickle.dumps(d, protocol=4))
    out = load_cifar_batch(f)
    assert out["labels"] == [0, 1] and out["extra"] == bytearray(b"abc")


@pytest.mark.parametrize(
    "labels", ["0123", [0, 1.5], [0, "1"], [0, None], [0, -1], [0, 100], [True, 0], {"a": 1}, [0]], ids=str
)
def test_cifar_label_lists_of_wrong_types_are_a_source_error(tmp_path, labels):
    from uedist.data.sources.cifar import _load_batch

    f = tmp_path / "data_batch_1"
    f.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, protocol=4))
    with pytest.raises(SourceError, match="integer labels"):
        _load_batch(str(f), 0, 0)
