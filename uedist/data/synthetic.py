"""Procedural class-conditional images: oriented sinusoidal textures, for tests and demos without real data.

Each class ``c`` owns a seeded *template*: ``GRATINGS`` oriented sinusoidal gratings (frequency vectors in cycles
per image, with weights). A sample of class ``c`` is

    L(x, y) = sum_k a_k sin(2 pi f_k' . (x, y) + phi_k)  +  distractor grating,   normalized to unit std,
    image   = clip(m + A * d * L + sigma * noise, 0, 1),

where ``f_k'`` is the template frequency slightly rotated and scaled, ``phi_k`` a random phase (translation),
``m`` a random mean colour, ``d`` a random unit colour direction, ``A`` a random contrast, and the distractor a
random grating unrelated to the class. Class evidence is therefore in the *texture* (which frequencies are
present), never in the colour: the per-class mean colour is the same for every class, so error-minimizing noise
(a few /255) can still become a shortcut for a network trained on it.
For the same reason no purifier can recover it: ``uedist.data.shapes`` is the counterpart for purification demos.

Determinism and parallelism: sample ``i`` of ``split`` uses ``np.random.default_rng([seed, stream, split_id, i])``
and the class templates use ``[seed, stream, c]``, so any image can be generated alone, in any order, in any
process; train and test share templates but not samples. A template does not depend on ``num_classes`` (class 3
of a 10-class set is class 3 of a 100-class set). Coordinates are normalized to ``[0, 1)``, so the same sample
at 16 px and at 256 px shows the same picture; frequencies stay below 6.2 cycles per image, under the 8-cycle
Nyquist limit at 16 px.

This module is pure numpy (no torch), so data workers can import it cheaply.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "SPLIT_IDS",
    "GENERATOR_VERSION",
    "GRATINGS",
    "class_template",
    "synthetic_label",
    "synthetic_labels",
    "synthetic_image",
    "synthetic_batch",
]

SPLIT_IDS: Dict[str, int] = {"train": 0, "val": 1, "test": 2}
GRATINGS = 3  # class gratings per template; 3 keeps >100 classes far apart in frequency space

# Stream tags keep the template / sample / label seed sequences disjoint whatever the other entries are.
_TEMPLATE_STREAM, _SAMPLE_STREAM, _LABEL_STREAM = 0, 1, 2

# Frequencies in cycles per image. The upper bound times the largest per-sample scale jitter (5.6 * 1.1 = 6.2)
# stays below Nyquist at 16 px (8 cycles); the lower bound keeps at least 1.5 periods visible.
_FREQ_RANGE = (1.5, 5.6)
_MIN_ANGLE_GAP = 0.35  # radians between gratings of one template, so a template is never one blurred grating

# Version of the picture format: bumped whenever a constant below changes what an index draws, and part of every
# sample's source reference, so a shard set built by an older generator never passes for a current one.
GENERATOR_VERSION = 2

# Per-sample difficulty knobs. Version 2 (measured: README, "Protecting a dataset"): low-contrast textures (8-23 /255,
# comparable to the 8 /255 noise budget, as the class evidence of natural images is to their perturbations) on a
# narrow mean-colour range, so a width-0.25 ResNet-18 still learns 10 classes at 32 px in 8 epochs (89 % test)
# while error-minimizing noise can hide them (SEM demo: 13.5 %) and random noise of the same budget cannot
# (72-75 %). Version 1 (contrast 20-64 /255, mean colour 0.25-0.75, pixel noise 5-15 /255) was learned at 93 %
# whatever 8 /255 noise was added: the noise could only enhance the textures it was made from.
_ROT_JITTER = 0.15  # radians, uniform +-, applied to all gratings of a sample together
_SCALE_JITTER = 0.10  # relative, uniform +-
_AMP_JITTER = (0.6, 1.4)  # per-grating weight multiplier
_DISTRACTOR_AMP = (0.0, 0.8)  # relative to the mean class-grating weight
_CONTRAST = (0.03, 0.09)  # A: std of the pattern in [0, 1] intensity units (8-23 /255)
_MEAN_COLOUR = (0.4, 0.6)  # per channel; wider ranges bury the faint textures (0.25-0.75: 11 % clean)
_NOISE_STD = (0.006, 0.018)  # per-pixel Gaussian noise, [0, 1] units (1.5-4.6 /255)


def _split_id(split: str) -> int:
    try:
        return SPLIT_IDS[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}") from None


@functools.lru_cache(maxsize=4096)
def class_template(label: int, *, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """The texture template of class ``label``: ``(freqs, weights)``.

    Returns ``freqs`` (GRATINGS, 2) float64 frequency vectors in cycles per image (|f| in ``_FREQ_RANGE``,
    orientation in [0, pi) since f and -f give the same grating) and ``weights`` (GRATINGS,) in [0.6, 1].
    Both arrays are read-only (they are cached).
    """
    rng = np.random.default_rng([seed, _TEMPLATE_STREAM, label])
    angles = _spread_angles(rng)
    # log-uniform magnitude: equal numbers of coarse and fine gratings per octave
    mags = np.exp(rng.uniform(np.log(_FREQ_RANGE[0]), np.log(_FREQ_RANGE[1]), size=GRATINGS))
    freqs = np.stack([mags * np.cos(angles), mags * np.sin(angles)], axis=1)
    weights = rng.uniform(0.6, 1.0, size=GRATINGS)
    freqs.flags.writeable = False
    weights.flags.writeable = False
    return freqs, weights


def _spread_angles(rng: np.random.Generator) -> np.ndarray:
    """GRATINGS orientations in [0, pi), pairwise (circularly) at least ``_MIN_ANGLE_GAP`` apart."""
    while True:  # rejection sampling; accepts with probability ~0.4 for 3 gratings
        angles = rng.uniform(0.0, np.pi, size=GRATINGS)
        diff = np.abs(angles[:, None] - angles[None, :])
        diff = np.minimum(diff, np.pi - diff)  # orientation is periodic with period pi
        if np.all(diff[np.triu_indices(GRATINGS, 1)] >= _MIN_ANGLE_GAP):
            return angles


def synthetic_labels(indices: Sequence[int], *, num_classes: int, seed: int, split: str) -> np.ndarray:
    """Labels of samples ``indices``: (N,) int64 in [0, num_classes).

    Balanced by construction: each aligned block ``[b*C, (b+1)*C)`` of indices holds every class exactly once, in
    a seeded order that depends on ``(seed, split, b)`` only (so labels are not ``index % C``, yet order-free).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    split_id = _split_id(split)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and idx.min() < 0:
        raise ValueError("indices must be non-negative")
    blocks, pos = np.divmod(idx, num_classes)
    out = np.empty_like(idx)
    for b in np.unique(blocks):
        perm = np.random.default_rng([seed, _LABEL_STREAM, split_id, int(b)]).permutation(num_classes)
        sel = blocks == b
        out[sel] = perm[pos[sel]]
    return out


def synthetic_label(index: int, *, num_classes: int, seed: int, split: str) -> int:
    """Label of sample ``index``: an int in [0, num_classes). See :func:`synthetic_labels`."""
    return int(synthetic_labels([index], num_classes=num_classes, seed=seed, split=split)[0])


def _sample_params(index: int, label: int, *, seed: int, split_id: int) -> Dict[str, np.ndarray]:
    """Draw one sample's random parameters from its own generator (the draw order is part of the format)."""
    rng = np.random.default_rng([seed, _SAMPLE_STREAM, split_id, index])
    freqs, weights = class_template(label, seed=seed)
    rot = rng.uniform(-_ROT_JITTER, _ROT_JITTER)
    scale = rng.uniform(1.0 - _SCALE_JITTER, 1.0 + _SCALE_JITTER)
    c, s = np.cos(rot), np.sin(rot)
    f = scale * freqs @ np.array([[c, s], [-s, c]])  # (K, 2): rotate every class grating by `rot`
    amps = weights * rng.uniform(*_AMP_JITTER, size=GRATINGS)
    # the distractor: a random grating of the same frequency band, unrelated to the class
    d_angle = rng.uniform(0.0, np.pi)
    d_mag = np.exp(rng.uniform(np.log(_FREQ_RANGE[0]), np.log(_FREQ_RANGE[1])))
    f = np.concatenate([f, [[d_mag * np.cos(d_angle), d_mag * np.sin(d_angle)]]])  # (K+1, 2)
    amps = np.append(amps, weights.mean() * rng.uniform(*_DISTRACTOR_AMP))
    phases = rng.uniform(0.0, 2.0 * np.pi, size=GRATINGS + 1)
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction) + 1e-12
    return {
        "freqs": f,
        "amps": amps / np.sqrt(0.5 * np.sum(amps**2)),  # a sum of sinusoids with these weights has unit std
        "phases": phases,
        "mean": rng.uniform(*_MEAN_COLOUR, size=3),
        "colour": direction * rng.uniform(*_CONTRAST),
        "noise_std": rng.uniform(*_NOISE_STD),
        "rng": rng,  # continues to draw the pixel noise
    }


def _render(params: Sequence[Dict[str, np.ndarray]], size: int) -> np.ndarray:
    """Render N parameter sets to (N, size, size, 3) uint8 in [0, 255].

    Uses sin(u + v) = sin(u) cos(v) + cos(u) sin(v) with u depending on x only and v on y only, so each image is
    two small (S, K) @ (K, S) products instead of K * S * S sines.
    """
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres in (0, 1): resolution-free
    freqs = np.stack([p["freqs"] for p in params])  # (N, K, 2)
    amps = np.stack([p["amps"] for p in params])[:, :, None]  # (N, K, 1)
    phases = np.stack([p["phases"] for p in params])[:, :, None]  # (N, K, 1)
    u = 2.0 * np.pi * freqs[:, :, 1:2] * coords + phases  # (N, K, S) along rows (y)
    v = 2.0 * np.pi * freqs[:, :, 0:1] * coords  # (N, K, S) along columns (x)
    lum = (amps * np.sin(u)).transpose(0, 2, 1) @ np.cos(v) + (amps * np.cos(u)).transpose(0, 2, 1) @ np.sin(v)
    out = np.empty((len(params), size, size, 3), dtype=np.uint8)
    for n, p in enumerate(params):  # (S, S, 3); float32 from here on: the noise dominates the rounding error
        img = p["mean"].astype(np.float32) + lum[n, :, :, None].astype(np.float32) * p["colour"].astype(np.float32)
        img += np.float32(p["noise_std"]) * p["rng"].standard_normal((size, size, 3), dtype=np.float32)
        out[n] = np.rint(np.clip(img, 0.0, 1.0) * 255.0)
    return out


def batch_request(
    indices: Sequence[int], labels: Optional[Sequence[int]], *, num_classes: int, size: int, seed: int, split: str
) -> Tuple[int, np.ndarray, np.ndarray]:
    """Check a batch request of any built-in generator: ``(split_id, indices, labels)`` as int64 arrays, the labels
    defaulting to :func:`synthetic_labels` (so every generator shares the same balanced labels)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    split_id = _split_id(split)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if labels is None:
        return split_id, idx, synthetic_labels(idx, num_classes=num_classes, seed=seed, split=split)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if lab.shape != idx.shape:
        raise ValueError(f"{lab.size} labels for {idx.size} indices")
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return split_id, idx, lab


def synthetic_batch(
    indices: Sequence[int],
    *,
    labels: Optional[Sequence[int]] = None,
    num_classes: int,
    size: int,
    seed: int,
    split: str,
) -> np.ndarray:
    """Images of samples ``indices``: (N, size, size, 3) uint8 in [0, 255] (HWC, RGB).

    ``labels`` defaults to :func:`synthetic_labels` of the same indices; pass them to draw other classes for the
    same per-sample randomness. ``synthetic_batch(ix)[j]`` equals ``synthetic_image(ix[j], label=...)`` exactly.
    """
    split_id, idx, lab = batch_request(indices, labels, num_classes=num_classes, size=size, seed=seed, split=split)
    if idx.size == 0:
        return np.empty((0, size, size, 3), dtype=np.uint8)
    params = [_sample_params(int(i), int(c), seed=seed, split_id=split_id) for i, c in zip(idx, lab)]
    return _render(params, size)


def synthetic_image(index: int, *, label: int, num_classes: int, size: int, seed: int, split: str) -> np.ndarray:
    """Image of sample ``index`` drawn from class ``label``: (size, size, 3) uint8 in [0, 255] (HWC, RGB).

    Depends only on ``(seed, split, index, label, size)`` (``num_classes`` only validates ``label``); use
    ``label=synthetic_label(index, ...)`` for the dataset's own label.
    """
    return synthetic_batch([index], labels=[label], num_classes=num_classes, size=size, seed=seed, split=split)[0]
