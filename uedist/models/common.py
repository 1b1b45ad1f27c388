"""What every model builder shares: the stem names and the width multiplier."""

from __future__ import annotations

STEMS = ("cifar", "imagenet")


def scaled(c: float, width: float) -> int:
    """Channel count ``c`` scaled by the width multiplier, rounded, at least 1."""
    return max(1, int(round(c * width)))


def check_stem(stem: str) -> None:
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; expected one of {STEMS}")
