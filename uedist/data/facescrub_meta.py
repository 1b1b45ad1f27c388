"""Parse the official FaceScrub metadata files (``facescrub_actors.txt``, ``facescrub_actresses.txt``).

Format (Ng & Winkler, "A data-driven approach to cleaning large face datasets", ICIP 2014): one face per line,
tab-separated columns ``name, image_id, face_id, url, bbox, sha256``, optionally preceded by the header line
``name<TAB>image_id<TAB>face_id<TAB>url<TAB>bbox<TAB>sha256``. ``bbox`` is ``x1,y1,x2,y2`` in pixels of the
downloaded photo (PIL crop convention: ``x2``/``y2`` exclusive); ``sha256`` is the hash of the downloaded bytes.

    rows, bad = read_facescrub_meta(["facescrub_actors.txt", "facescrub_actresses.txt"], skip_bad=True)

Every row remembers where it came from (``source = "file:line"``, line numbers from 1) so that every error,
skipped row and failed download can be traced back to its metadata line.

The crops written from these rows are laid out as ``<out>/<safe_identity_dirname(name)>/<face_id>.<ext>``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple, Union

from uedist.io import atomic_open

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
BBox = Tuple[int, int, int, int]

HEADER_COLUMNS = ("name", "image_id", "face_id", "url", "bbox", "sha256")
KIND_MALFORMED = "malformed"
KIND_BAD_BBOX = "bad bbox"

_UINT_RE = re.compile(r"[0-9]+")
_INT_RE = re.compile(r"-?[0-9]+")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_UNSAFE_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_DIRNAME_LEN = 255  # bytes == chars here: the result is ASCII


class FacescrubMetadataError(ValueError):
    """A malformed metadata row or a bad bbox; ``str()`` starts with ``file:line``."""

    def __init__(self, source: str, kind: str, reason: str) -> None:
        super().__init__(f"{source}: {kind}: {reason}")
        self.source = source
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class FaceRow:
    """One face of the FaceScrub metadata.

    ``bbox`` is ``(x1, y1, x2, y2)`` in pixels, ``0 <= x1 < x2``, ``0 <= y1 < y2`` (``x2``, ``y2`` exclusive);
    ``sha256`` is lower-case hex; ``source`` is ``"file:line"`` (line from 1).
    """

    name: str
    image_id: int
    face_id: int
    url: str
    bbox: BBox
    sha256: str
    source: str


@dataclass(frozen=True)
class BadRow:
    """A metadata line that was skipped: ``kind`` is ``"malformed"`` or ``"bad bbox"``, ``text`` the raw line."""

    source: str
    kind: str
    reason: str
    text: str


def safe_identity_dirname(name: str) -> str:
    """Folder name for an identity: ``"Alec Baldwin"`` -> ``"Alec_Baldwin"``.

    Surrounding whitespace is dropped, every character outside ``[A-Za-z0-9._-]`` becomes ``"_"``, and leading
    dots become ``"_"`` too (no hidden folders, never ``"."`` or ``".."``), so the result is always a single,
    non-empty path component. Raises ``ValueError`` for names without any letter or digit (they would all
    collapse onto names like ``"___"``) and for results longer than 255 characters.
    """
    stripped = name.strip()
    if not any(ch.isascii() and ch.isalnum() for ch in stripped):
        raise ValueError(f"identity name {name!r} has no ASCII letter or digit; cannot make a folder name from it")
    safe = _UNSAFE_CHARS_RE.sub("_", stripped)
    n_dots = len(safe) - len(safe.lstrip("."))
    safe = "_" * n_dots + safe[n_dots:]
    if len(safe) > _MAX_DIRNAME_LEN:
        raise ValueError(f"identity name {name!r} is longer than {_MAX_DIRNAME_LEN} characters")
    return safe


def parse_bbox(text: str) -> BBox:
    """Parse ``"x1,y1,x2,y2"`` (non-negative ints, ``x2 > x1``, ``y2 > y1``); ``ValueError`` says what is wrong."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4 or not all(_INT_RE.fullmatch(p) for p in parts):
        raise ValueError(f"bbox {text!r} is not x1,y1,x2,y2 with integers")
    x1, y1, x2, y2 = (int(p) for p in parts)
    if min(x1, y1, x2, y2) < 0:
        raise ValueError(f"negative coordinate in bbox {text!r}")
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"degenerate bbox {text!r} (needs x2 > x1 and y2 > y1)")
    return (x1, y1, x2, y2)


def _is_header(fields: Sequence[str]) -> bool:
    return tuple(f.strip().lower() for f in fields) == HEADER_COLUMNS


def _parse_fields(fields: Sequence[str], source: str) -> FaceRow:
    """Build a ``FaceRow`` from the 6 columns or raise ``FacescrubMetadataError``."""
    if len(fields) != len(HEADER_COLUMNS):
        raise FacescrubMetadataError(source, KIND_MALFORMED, f"expected 6 tab-separated columns, got {len(fields)}")
    name, image_id, face_id, url, bbox_text, sha = (f.strip() for f in fields)
    problems = []
    if not name:
        problems.append("empty name")
    else:
        try:
            safe_identity_dirname(name)
        except ValueError as exc:
            problems.append(str(exc))
    for label, value in (("image_id", image_id), ("face_id", face_id)):
        if not _UINT_RE.fullmatch(value):
            problems.append(f"{label} {value!r} is not a non-negative integer")
    if not url.lower().startswith(("http://", "https://")) or any(ch.isspace() for ch in url):
        problems.append(f"url {url!r} is not an http(s) URL")
    if not _SHA256_RE.fullmatch(sha):
        problems.append(f"sha256 {sha!r} is not 64 hex characters")
    if problems:
        raise FacescrubMetadataError(source, KIND_MALFORMED, "; ".join(problems))
    try:
        bbox = parse_bbox(bbox_text)
    except ValueError as exc:
        raise FacescrubMetadataError(source, KIND_BAD_BBOX, str(exc)) from None
    return FaceRow(name, int(image_id), int(face_id), url, bbox, sha.lower(), source)


def _read_lines(path: Path) -> Iterable[Tuple[int, Union[str, None]]]:
    """Yield ``(line_number, text)``; ``text`` is ``None`` for a line that is not valid UTF-8."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            data = raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw  # UTF-8 byte order mark
            try:
                yield lineno, data.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield lineno, None


def parse_facescrub_file(path: PathLike, *, skip_bad: bool = False) -> Tuple[List[FaceRow], List[BadRow]]:
    """Parse one metadata file into ``(rows, bad_rows)``; blank lines and a leading header line are ignored.

    A malformed line (wrong column count, non-integer ids, sha256 not 64 hex chars, non-http(s) url, name
    without letters or digits, not UTF-8) or a bad bbox (syntax, negative, ``x2 <= x1`` or ``y2 <= y1``) raises
    ``FacescrubMetadataError`` naming ``file:line``; with ``skip_bad=True`` it is returned in ``bad_rows``
    instead (``bad_rows`` is always empty otherwise).
    """
    path = Path(path)
    rows: List[FaceRow] = []
    bad: List[BadRow] = []
    seen_content = False
    for lineno, text in _read_lines(path):
        source = f"{path}:{lineno}"
        try:
            if text is None:
                raise FacescrubMetadataError(source, KIND_MALFORMED, "line is not valid UTF-8")
            if not text.strip():
                continue
            fields = text.split("\t")
            if not seen_content and _is_header(fields):
                seen_content = True
                continue
            seen_content = True
            rows.append(_parse_fields(fields, source))
        except FacescrubMetadataError as exc:
            if not skip_bad:
                raise
            bad.append(BadRow(source, exc.kind, exc.reason, text if text is not None else "<not UTF-8>"))
    return rows, bad


def read_facescrub_meta(
    paths: Union[PathLike, Iterable[PathLike]], *, skip_bad: bool = False
) -> Tuple[List[FaceRow], List[BadRow]]:
    """Parse one or several metadata files (in order) into ``(rows, bad_rows)``; see ``parse_facescrub_file``."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows: List[FaceRow] = []
    bad: List[BadRow] = []
    for path in paths:
        file_rows, file_bad = parse_facescrub_file(path, skip_bad=skip_bad)
        logger.info("%s: %d rows, %d bad rows skipped", path, len(file_rows), len(file_bad))
        rows.extend(file_rows)
        bad.extend(file_bad)
    return rows, bad


def _tsv_field(value: object) -> str:
    return re.sub(r"[\t\r\n]", " ", str(value))


def write_tsv_atomic(path: PathLike, header: Sequence[str], records: Iterable[Sequence[object]]) -> Path:
    """Write a UTF-8 TSV (tabs/newlines inside fields become spaces) atomically; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as fh:
        fh.write("\t".join(header) + "\n")
        for record in records:
            fh.write("\t".join(_tsv_field(v) for v in record) + "\n")
    return path


def write_bad_rows_tsv(bad: Iterable[BadRow], path: PathLike) -> Path:
    """Record skipped metadata lines as TSV ``source, kind, reason, text`` (atomic write)."""
    records = ((b.source, b.kind, b.reason, b.text) for b in bad)
    return write_tsv_atomic(path, ("source", "kind", "reason", "text"), records)
