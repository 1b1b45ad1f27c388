"""Procedural class-conditional images, second style: a coloured shape per class on a random background.

The built-in texture set (``uedist.data.synthetic``) hides its class evidence in faint textures, so that an 8/255
noise can hide it; for the same reason no purifier can recover it. This set is the counterpart for purification
studies: its class evidence is coarse and strong, like an object's silhouette, so a rate-limited VAE keeps it
while the noise goes. Each class ``c`` owns one of ten coarse *shapes* (``SHAPES[c % 10]``: disc, ring, bar,
cross, two discs, triangle, crescent, hollow square, L, half disc) and a seeded *colour tendency*. A sample is

    mask  = the class's shape at a random position, size, aspect ratio and rotation (one-pixel soft edge),
    image = clip(mask * fg + (1 - mask) * (bg + distractor grating) + sigma * noise, 0, 1),

where ``fg`` is the class colour plus a uniform ±0.22 jitter per channel, ``bg`` a random colour at least 0.3 away
from ``fg`` in some channel, and the distractor a faint random grating unrelated to the class. The shape's
geometry is the class evidence (a network learns it from grey images too); the colour tendency is a partial,
overlapping cue on the shape only, and the image's mean colour carries none (the background dominates it).
Classes beyond ten repeat the ten shapes and differ only by their colour tendency, so a set with many classes is
much harder than the default ten.

Measured (README, "Purifying"; victim ``configs/victim/synthetic.yaml``, 8 epochs): clean 80.9 %; class-wise EM
28.5 %; D-VAE(class-wise EM) 73.0 % (90 % of clean). Error-minimizing noise made by an *adversarially trained*
surrogate (SEM) does not protect it: robust, high-contrast shapes are learned by that surrogate as fast as by the
victim (clean test 66 % after the demo's 300 steps), and the noise then reinforces them (victim 58.7 %), the
failure the texture set was designed to avoid.

Determinism and parallelism as in ``uedist.data.synthetic``: sample ``i`` of ``split`` uses
``np.random.default_rng([seed, 1, split_id, i])`` and class colours ``[seed, 0, c, 7]``; labels are
:func:`uedist.data.synthetic.synthetic_labels` (balanced, order-free). Coordinates are normalized to ``[0, 1)``, so
the same sample at 16 px and at 256 px shows the same picture.

This module is pure numpy (no torch), so data workers can import it cheaply.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np

from uedist.data.synthetic import batch_request

__all__ = ["SHAPES_VERSION", "SHAPES", "class_colour", "shapes_batch", "shapes_image"]

SHAPES = ("disc", "ring", "bar", "cross", "two_discs", "triangle", "crescent", "hollow_square", "l_shape", "half_disc")

# Stream tags (those of uedist.data.synthetic): class colours and samples use disjoint seed sequences.
_CLASS_STREAM, _SAMPLE_STREAM = 0, 1

# Version of the picture format: bumped whenever a constant below changes what an index draws, and part of every
# sample's source reference, so a shard set built by an older generator never passes for a current one.
SHAPES_VERSION = 1

# Per-sample knobs, in units of the image side unless noted.
_CLASS_COLOUR = (0.25, 0.75)  # per channel: the class's colour tendency
_COLOUR_JITTER = 0.22  # uniform +- per channel around it: colour is a partial, overlapping cue
_MIN_CONTRAST = 0.3  # shape vs background, max over channels
_BACKGROUND = (0.1, 0.9)  # per channel
_CENTRE = (0.38, 0.62)  # shape centre, per axis
_RADIUS = (0.25, 0.38)  # shape size (half its extent before the aspect ratio)
_LOG_ASPECT = 0.25  # aspect ratio exp(U(-0.25, 0.25)): 0.78-1.28
_GRATING_FREQ = (1.5, 5.6)  # background distractor, cycles per image (log-uniform)
_GRATING_AMP = (0.02, 0.08)
_NOISE_STD = (0.006, 0.018)  # per-pixel Gaussian noise, [0, 1] units (1.5-4.6 /255)


@functools.lru_cache(maxsize=4096)
def class_colour(label: int, *, seed: int) -> np.ndarray:
    """The colour class ``label``'s shapes tend to: (3,) float64 RGB in ``_CLASS_COLOUR`` (read-only, cached)."""
    colour = np.random.default_rng([seed, _CLASS_STREAM, label, 7]).uniform(*_CLASS_COLOUR, size=3)
    colour.flags.writeable = False
    return colour


def _shape_sdf(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance to shape ``SHAPES[kind]`` in its own unit coordinates (negative inside, extent about ±1)."""
    if kind == 0:  # disc
        return np.hypot(u, v) - 1.0
    if kind == 1:  # ring
        return np.abs(np.hypot(u, v) - 0.72) - 0.28
    if kind == 2:  # bar
        return np.maximum(np.abs(u) - 1.15, np.abs(v) - 0.4)
    if kind == 3:  # cross
        return np.minimum(np.maximum(np.abs(u) - 1.05, np.abs(v) - 0.3), np.maximum(np.abs(u) - 0.3, np.abs(v) - 1.05))
    if kind == 4:  # two discs
        return np.minimum(np.hypot(u - 0.58, v) - 0.5, np.hypot(u + 0.58, v) - 0.5)
    if kind == 5:  # triangle (equilateral, centred)
        k, w = np.sqrt(3.0) / 2.0, v - 0.15
        return 1.3 * np.maximum.reduce([-w - 0.55, k * u + 0.5 * w - 0.55, -k * u + 0.5 * w - 0.55])
    if kind == 6:  # crescent
        return np.maximum(np.hypot(u, v) - 1.0, 0.8 - np.hypot(u - 0.55, v))
    if kind == 7:  # hollow square
        return np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.72) - 0.26
    if kind == 8:  # L
        return np.minimum(
            np.maximum(np.abs(u + 0.65) - 0.33, np.abs(v) - 1.0), np.maximum(np.abs(u) - 1.0, np.abs(v - 0.67) - 0.33)
        )
    return np.maximum(np.hypot(u, v + 0.35) - 1.0, -(v + 0.35))  # half disc


def _render_one(index: int, label: int, *, seed: int, split_id: int, size: int) -> np.ndarray:
    """One sample as (size, size, 3) uint8 (the draw order is part of the format)."""
    rng = np.random.default_rng([seed, _SAMPLE_STREAM, split_id, index])
    cx, cy = rng.uniform(*_CENTRE, size=2)
    radius = rng.uniform(*_RADIUS)
    aspect = np.exp(rng.uniform(-_LOG_ASPECT, _LOG_ASPECT))
    rot = rng.uniform(0.0, 2.0 * np.pi)
    base = class_colour(label, seed=seed)
    while True:  # rejection: the shape must stand out from its background (accepts ~90 % of draws)
        fg = np.clip(base + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=3), 0.05, 0.95)
        bg = rng.uniform(*_BACKGROUND, size=3)
        if np.abs(fg - bg).max() > _MIN_CONTRAST:
            break
    coords = (np.arange(size) + 0.5) / size  # pixel centres in (0, 1): resolution-free
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(rot), np.sin(rot)
    u = (c * dx + s * dy) / (radius * aspect)
    v = (c * dy - s * dx) / (radius / aspect)
    # signed distance in pixels (approximately: the aspect ratio stretches it by at most 28 %) -> a 1 px soft edge
    mask = np.clip(0.5 - _shape_sdf(label % len(SHAPES), u, v) * radius * size, 0.0, 1.0)[:, :, None]
    freq = np.exp(rng.uniform(np.log(_GRATING_FREQ[0]), np.log(_GRATING_FREQ[1])))
    angle = rng.uniform(0.0, np.pi)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    grating = np.sin(2.0 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    texture = rng.uniform(*_GRATING_AMP) * grating[:, :, None] * rng.standard_normal(3) / np.sqrt(3.0)
    img = mask * fg + (1.0 - mask) * (bg + texture)
    img = img + rng.uniform(*_NOISE_STD) * rng.standard_normal((size, size, 3))
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def shapes_batch(
    indices: Sequence[int],
    *,
    labels: Optional[Sequence[int]] = None,
    num_classes: int,
    size: int,
    seed: int,
    split: str,
) -> np.ndarray:
    """Images of samples ``indices``: (N, size, size, 3) uint8 in [0, 255] (HWC, RGB).

    ``labels`` defaults to :func:`uedist.data.synthetic.synthetic_labels` of the same indices; pass them to draw
    other classes for the same per-sample randomness. ``shapes_batch(ix)[j]`` equals
    ``shapes_image(ix[j], label=...)`` exactly.
    """
    split_id, idx, lab = batch_request(indices, labels, num_classes=num_classes, size=size, seed=seed, split=split)
    out = np.empty((idx.size, size, size, 3), dtype=np.uint8)
    for n, (i, c) in enumerate(zip(idx, lab)):
        out[n] = _render_one(int(i), int(c), seed=seed, split_id=split_id, size=size)
    return out


def shapes_image(index: int, *, label: int, num_classes: int, size: int, seed: int, split: str) -> np.ndarray:
    """Image of sample ``index`` drawn from class ``label``: (size, size, 3) uint8 in [0, 255] (HWC, RGB).

    Depends only on ``(seed, split, index, label, size)`` (``num_classes`` only validates ``label``); use
    ``label=synthetic_label(index, ...)`` (``uedist.data.synthetic``) for the dataset's own label.
    """
    return shapes_batch([index], labels=[label], num_classes=num_classes, size=size, seed=seed, split=split)[0]
