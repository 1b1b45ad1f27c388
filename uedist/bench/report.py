"""The benchmarks' output: Markdown tables, short durations, and each script's JSON + Markdown pair."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from uedist.io import atomic_write_json, atomic_write_text


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """The lines of a Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default all ``l``)."""
    align = align or "l" * len(header)
    assert len(align) == len(header), (align, header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def write_report(out: Path, name: str, result: dict[str, Any], *, markdown: str) -> tuple[Path, Path]:
    """Write ``out/<name>.json`` (``result``) and ``out/<name>.md`` (``markdown``), each atomically; returns both."""
    out = Path(out)
    return atomic_write_json(out / f"{name}.json", result), atomic_write_text(out / f"{name}.md", markdown)


def fmt_duration(s: float) -> str:
    """Seconds as a short human duration: ``"42 s"``, ``"17 min"``, ``"3.5 h"``, ``"2.1 d"``."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"
