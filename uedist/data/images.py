"""Image decoding, mode conversion, canonical resizing and lossless/lossy encoding (numpy + Pillow, no torch).

Every image that enters a shard set goes through ``load_rgb`` (any mode -> 8-bit RGB) and ``to_canonical``
(fixed size per dataset), so every sample of a set has one shape and sample-wise noise has one shape too.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = 200_000_000  # refuse decompression bombs, but allow large photos
# Bounds checked from the header, before anything is decoded or resized (no small file may size a huge allocation):
# the decode's peak working set (the raw bands plus the conversion to 8-bit RGB), the decoded size a file may claim
# per byte of itself beyond a small image (a real photo compresses ~10:1; a flat 16-bit bomb ~10,000:1), and the
# intermediate image of a resize (a 1 x 10^7 strip scaled to fill 32 x 32 would be 32 x 3.2*10^8).
MAX_DECODE_BYTES = 2 << 30
MAX_EXPANSION, SMALL_DECODE_BYTES = 1_000, 64 << 20
MAX_RESIZE_PIXELS = 64_000_000
# bytes per pixel while decoding and converting, by PIL mode (unlisted modes: 12 bytes)
# (the raw bands, each intermediate of _to_uint8_rgb, the RGB result and its copy)
_MODE_BYTES = {"1": 8, "L": 8, "P": 8, "RGB": 9, "RGBA": 18, "LA": 18, "PA": 18, "CMYK": 10, "YCbCr": 9}
_MODE_BYTES.update({m: 22 for m in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")})

ResizeMode = Literal["center_crop", "squash", "none"]
ENCODINGS = ("jpg", "png", "npy")
LOSSLESS = ("png", "npy")


class CorruptImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def _to_uint8_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and float images are rescaled, alpha is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img)
        if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):  # float32: 4 bytes a pixel, not 8
            a = a.astype(np.float32) / (65535.0 if a.max(initial=0) > 255 or mode.startswith("I;16") else 255.0)
        elif mode == "F":
            hi = float(a.max(initial=0))
            a = a / np.float32(hi if hi > 1.0 else 1.0)
        else:
            a = a / np.float32(255.0)
        a8 = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, 1, LAB, HSV


def load_rgb(data: bytes, name: str = "<bytes>") -> Tuple[np.ndarray, str]:
    """Decode encoded image bytes -> (uint8 array (H, W, 3), the file's format e.g. "JPEG").

    Raises CorruptImageError naming ``name`` for anything Pillow cannot fully decode (truncated files included).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or "?"
                _check_decode_size(img, len(data), name)
                img.load()  # decode now: a truncated file fails here, not later
                rgb = _to_uint8_rgb(img)
                return np.asarray(rgb, dtype=np.uint8).copy(), fmt
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CorruptImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e


def _check_decode_size(img: Image.Image, nbytes: int, name: str) -> None:
    """Refuse, from the header alone, an image whose decode would need more than :data:`MAX_DECODE_BYTES` or that
    claims more than :data:`MAX_EXPANSION` decoded bytes per byte of file (beyond a small image)."""
    w, h = img.size
    need = w * h * _MODE_BYTES.get(img.mode, 12)
    if need > MAX_DECODE_BYTES:
        raise CorruptImageError(
            f"cannot decode image {name}: {w}x{h} {img.mode} would need {need / 2**30:.1f} GiB to decode "
            f"(limit {MAX_DECODE_BYTES / 2**30:.0f} GiB)"
        )
    if need > SMALL_DECODE_BYTES and need > MAX_EXPANSION * max(nbytes, 1):
        raise CorruptImageError(
            f"cannot decode image {name}: a {nbytes}-byte file claims {w}x{h} {img.mode} "
            f"({need / 2**20:.0f} MiB decoded, over {MAX_EXPANSION}x its size): refused as a decompression bomb"
        )


def to_canonical(arr: np.ndarray, size: Tuple[int, int], mode: ResizeMode = "center_crop") -> np.ndarray:
    """Resize uint8 (H, W, 3) to ``size`` = (height, width).

    ``center_crop``: scale the shorter side to fit (bicubic, antialiased), then crop the centre — the usual
    ImageNet preprocessing; ``squash``: resize both sides directly; ``none``: require the exact size.
    """
    h, w = arr.shape[:2]
    th, tw = size
    if (h, w) == (th, tw):
        return arr
    if mode == "none":
        raise ValueError(f"image is {h}x{w}, expected {th}x{tw} (resize_mode=none)")
    img = Image.fromarray(arr)
    if mode == "squash":
        return np.asarray(img.resize((tw, th), Image.BICUBIC), dtype=np.uint8)
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if nh * nw > MAX_RESIZE_PIXELS:  # an extreme aspect ratio: resample only the centre box, never the whole strip
        bw, bh = tw / scale, th / scale
        x0, y0 = (w - bw) / 2, (h - bh) / 2
        return np.asarray(img.resize((tw, th), Image.BICUBIC, box=(x0, y0, x0 + bw, y0 + bh)), dtype=np.uint8)
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return np.asarray(img.crop((left, top, left + tw, top + th)), dtype=np.uint8)


def encode_image(arr: np.ndarray, encoding: str, jpeg_quality: int = 95) -> bytes:
    """uint8 (H, W, 3) -> bytes. Deterministic: the same pixels give the same bytes."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    if encoding == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        return buf.getvalue()
    buf = io.BytesIO()
    img = Image.fromarray(arr, "RGB")
    if encoding == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif encoding == "jpg":
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; choose from {ENCODINGS}")
    return buf.getvalue()


def decode_image(
    data: bytes, ext: str, size: Optional[Tuple[int, int]] = None, *, name: str = "<sample>"
) -> np.ndarray:
    """Sample bytes (``ext`` in jpg/png/npy) -> uint8 (H, W, 3); checks the size when given. Never unpickles."""
    if ext == "npy":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            raise CorruptImageError(f"cannot decode {name}: {e}") from e
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise CorruptImageError(f"{name}: raw image must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    else:
        arr, _ = load_rgb(data, name)
    if size is not None and tuple(arr.shape[:2]) != tuple(size):
        raise CorruptImageError(f"{name}: image is {arr.shape[0]}x{arr.shape[1]}, manifest says {size[0]}x{size[1]}")
    return arr


@dataclass
class Prepared:
    """One sample ready for a shard: encoded bytes, their extension, and the label."""

    data: bytes
    ext: str
    label: int


def prepare_sample(
    raw: "bytes | np.ndarray",
    *,
    label: int,
    name: str,
    size: Tuple[int, int],
    encoding: str,
    resize_mode: ResizeMode = "center_crop",
    jpeg_quality: int = 95,
    keep_source_bytes: bool = True,
) -> Prepared:
    """Source image (encoded bytes or uint8 HWC array) -> canonical-size encoded sample.

    The source's own JPEG bytes are kept unchanged when they already are RGB at the canonical size and the set
    is JPEG-encoded (no second lossy round trip, e.g. the CIFAR-10 JPEG folders).
    """
    if isinstance(raw, (bytes, bytearray)):
        arr, fmt = load_rgb(bytes(raw), name)
        if (
            keep_source_bytes
            and encoding == "jpg"
            and fmt == "JPEG"
            and tuple(arr.shape[:2]) == tuple(size)
            and _is_plain_rgb_jpeg(bytes(raw))
        ):
            return Prepared(bytes(raw), "jpg", label)
    else:
        arr = raw
    try:
        arr = to_canonical(arr, size, resize_mode)
    except ValueError as e:
        raise CorruptImageError(f"{name}: {e}") from e
    return Prepared(encode_image(arr, encoding, jpeg_quality), encoding, label)


def _is_plain_rgb_jpeg(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as img:
        return img.mode == "RGB"
