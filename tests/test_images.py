"""Any input mode becomes 8-bit RGB; corrupt and truncated files fail naming the file; encodings round-trip."""

import io

import numpy as np
import pytest
from PIL import Image

from uedist.data.images import CorruptImageError, decode_image, encode_image, load_rgb, prepare_sample, to_canonical


def _bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_modes_convert_to_rgb():
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    gray, _ = load_rgb(_bytes(base.convert("L"), "PNG"))
    assert gray.shape == (12, 10, 3) and (gray[..., 0] == gray[..., 1]).all()
    cmyk, fmt = load_rgb(_bytes(base.convert("CMYK"), "JPEG"))
    assert cmyk.shape == (12, 10, 3) and fmt == "JPEG"
    pal, _ = load_rgb(_bytes(base.convert("P"), "PNG"))
    assert pal.shape == (12, 10, 3)
    rgba = Image.fromarray(np.dstack([rgb, np.zeros((12, 10), np.uint8)]), "RGBA")  # fully transparent
    out, _ = load_rgb(_bytes(rgba, "PNG"))
    assert (out == 255).all()  # composited on white, not the hidden colours
    deep = Image.fromarray((np.arange(120, dtype=np.uint16).reshape(12, 10) * 500))  # mode I;16
    out16, _ = load_rgb(_bytes(deep, "PNG"))
    assert out16.dtype == np.uint8 and out16.max() > 200 and out16.min() == 0  # rescaled, not clipped to white


def test_corrupt_and_truncated_name_the_file():
    good = _bytes(Image.new("RGB", (64, 64), (10, 20, 30)), "JPEG")
    with pytest.raises(CorruptImageError, match="photo_17.jpg"):
        load_rgb(good[: len(good) // 2], "photo_17.jpg")
    with pytest.raises(CorruptImageError, match="junk.png"):
        load_rgb(b"not an image at all", "junk.png")


def test_canonical_resize_modes():
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, 20:60] = 255  # the centre band survives a centre crop
    c = to_canonical(a, (32, 32), "center_crop")
    assert c.shape == (32, 32, 3) and c[16, 16, 0] == 255
    assert to_canonical(a, (16, 24), "squash").shape == (16, 24, 3)
    with pytest.raises(ValueError, match="resize_mode=none"):
        to_canonical(a, (32, 32), "none")


@pytest.mark.parametrize("enc", ["png", "npy"])
def test_lossless_roundtrip_exact(enc):
    a = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    data = encode_image(a, enc)
    assert encode_image(a, enc) == data  # deterministic bytes
    assert (decode_image(data, enc, (9, 7)) == a).all()
    with pytest.raises(CorruptImageError, match="manifest says 8x7"):
        decode_image(data, enc, (8, 7))


def test_npy_never_unpickles():
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptImageError):
        decode_image(buf.getvalue(), "npy")


def test_source_jpeg_bytes_kept_when_canonical():
    src = _bytes(Image.fromarray(np.full((32, 32, 3), 77, np.uint8)), "JPEG")
    p = prepare_sample(src, label=3, name="x.jpg", size=(32, 32), encoding="jpg")
    assert p.data == src and p.ext == "jpg"
    q = prepare_sample(src, label=3, name="x.jpg", size=(16, 16), encoding="png")
    assert q.ext == "png" and decode_image(q.data, "png").shape == (16, 16, 3)
