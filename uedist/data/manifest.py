"""``manifest.json``: the contract between stages (shards/README.md, docs/architecture.md).

A shard set is a folder: ``manifest.json`` + ``shard-NNNNNN.tar`` WebDataset shards. The manifest is written
last, atomically, so its presence means every shard it lists is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from uedist import __version__
from uedist.io import atomic_write_json

FORMAT = "uedist-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A missing, unreadable or inconsistent manifest; the message names the file and the field."""


@dataclass
class ShardInfo:
    name: str  # file name inside the shard set folder, e.g. "shard-000003.tar"
    count: int  # samples in the shard
    sha256: str
    bytes: int
    first_key: Optional[str] = None
    last_key: Optional[str] = None


@dataclass
class Manifest:
    dataset: str
    split: str
    classes: List[str]  # class names in label order
    image_size: Tuple[int, int]  # (height, width), the same for every sample
    encoding: str  # jpg | png | npy
    shards: List[ShardInfo]
    num_samples: int = 0
    class_counts: List[int] = field(default_factory=list)
    skipped: List[Dict[str, Any]] = field(default_factory=list)  # inputs left out (corrupt images), with reasons
    provenance: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)  # stage-specific facts (e.g. eps of a noise set)
    format: str = FORMAT
    version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def lossless(self) -> bool:
        return self.encoding in ("png", "npy")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["num_classes"] = self.num_classes
        return d

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        return atomic_write_json(Path(folder) / MANIFEST, self.to_dict())

    def check_compatible(self, other: "Manifest", what: str = "") -> None:
        """Raise ManifestError unless ``other`` has the same classes and image size (e.g. train vs test)."""
        if self.classes != other.classes:
            a, b = set(self.classes), set(other.classes)
            diff = (
                f"only in first: {sorted(a - b)[:5]}, only in second: {sorted(b - a)[:5]}"
                if a != b
                else "same names, different order"
            )
            raise ManifestError(f"{what}class lists differ ({self.num_classes} vs {other.num_classes} classes; {diff})")
        if tuple(self.image_size) != tuple(other.image_size):
            raise ManifestError(f"{what}image sizes differ: {self.image_size} vs {other.image_size}")


MAX_MANIFEST_BYTES = 256 << 20  # a manifest lists shards, not samples: 256 MiB is ~1M shards


_REQUIRED = ("dataset", "split", "classes", "image_size", "encoding", "shards", "num_samples")


def load_manifest(folder: Union[str, os.PathLike]) -> Manifest:
    """Read and check ``folder/manifest.json``; every problem is a ManifestError naming the file."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        hint = (
            " (an unfinished build? rerun the same command to resume it)"
            if (Path(folder) / "_progress").is_dir()
            else ""
        )
        raise ManifestError(f"no manifest: {path} does not exist{hint}")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: {size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES} bytes)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    if d.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a uedist shard manifest (format={d.get('format')!r})")
    if d.get("version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: manifest version {d.get('version')!r}, this uedist reads {FORMAT_VERSION}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ManifestError(f"{path}: missing field(s) {missing}")
    try:
        shards = [ShardInfo(**s) for s in d["shards"]]
        m = Manifest(
            dataset=str(d["dataset"]),
            split=str(d["split"]),
            classes=[str(c) for c in d["classes"]],
            image_size=(int(d["image_size"][0]), int(d["image_size"][1])),
            encoding=str(d["encoding"]),
            shards=shards,
            num_samples=int(d["num_samples"]),
            class_counts=[int(c) for c in d.get("class_counts", [])],
            skipped=list(d.get("skipped", [])),
            provenance=dict(d.get("provenance", {})),
            extra=dict(d.get("extra", {})),
        )
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise ManifestError(f"{path}: malformed field: {e}") from e
    if m.encoding not in ("jpg", "png", "npy"):
        raise ManifestError(f"{path}: unknown encoding {m.encoding!r}")
    check_manifest(m, path)
    for s in shards:
        if "/" in s.name or "\\" in s.name or s.name in ("", ".", ".."):
            raise ManifestError(f"{path}: shard name {s.name!r} is not a plain file name")
    return m


def keys_of(m: Manifest) -> Optional[List[int]]:
    """Every key of the set, sorted, from the manifest alone: each shard's key range less the skipped keys. None
    when that does not give each shard's count (a set whose keys have gaps the manifest does not list)."""
    gone = {int(s["key"]) for s in m.skipped if str(s.get("key", "")).isdigit()}
    keys: List[int] = []
    for sh in m.shards:
        if sh.count == 0:
            continue
        if sh.first_key is None or sh.last_key is None:
            return None
        ks = [k for k in range(int(sh.first_key), int(sh.last_key) + 1) if k not in gone]
        if len(ks) != sh.count:
            return None
        keys += ks
    return sorted(keys)


def check_manifest(m: Manifest, path: Any) -> None:
    """The sanity a manifest must have before any shard is read (ManifestError naming ``path`` and the field):
    a positive image size, non-negative shard counts and sizes, class counts that fit the classes and the
    samples, and shards whose key ranges (``first_key``..``last_key``) are ordered and disjoint (so no key can be
    in two shards: each shard's keys are checked against its range as it is read)."""
    h, w = m.image_size
    if h <= 0 or w <= 0:
        raise ManifestError(f"{path}: image_size [{h}, {w}] must be two positive ints")
    if not m.classes:
        raise ManifestError(f"{path}: no classes")
    for s in m.shards:
        if s.count < 0 or s.bytes < 0:
            raise ManifestError(f"{path}: {s.name}: count {s.count}, bytes {s.bytes}: must be >= 0")
    if sum(s.count for s in m.shards) != m.num_samples:
        raise ManifestError(
            f"{path}: shard counts sum to {sum(s.count for s in m.shards)}, num_samples is {m.num_samples}"
        )
    c = m.class_counts
    if c:
        if len(c) != m.num_classes:
            raise ManifestError(f"{path}: class_counts has {len(c)} entries for {m.num_classes} classes")
        if min(c) < 0:
            raise ManifestError(f"{path}: class_counts {c[:10]} has a negative count")
        if sum(c) != m.num_samples:
            raise ManifestError(f"{path}: class_counts sum to {sum(c)}, num_samples is {m.num_samples}")
    ranged = [s for s in m.shards if s.first_key is not None and s.last_key is not None and s.count > 0]
    for s in ranged:
        if s.first_key > s.last_key:  # type: ignore[operator]
            raise ManifestError(f"{path}: {s.name}: first_key {s.first_key} after last_key {s.last_key}")
    by_first = sorted(ranged, key=lambda s: s.first_key)  # type: ignore[arg-type,return-value]
    for a, b in zip(by_first, by_first[1:]):
        if b.first_key <= a.last_key:  # type: ignore[operator]
            raise ManifestError(
                f"{path}: the key ranges of {a.name} ({a.first_key}..{a.last_key}) and {b.name} "
                f"({b.first_key}..{b.last_key}) overlap: a key may be in both (a shard copied over another?)"
            )


def content_digest(folder: Union[str, os.PathLike]) -> Optional[str]:
    """A short digest of a finished shard set's content (its shards' sha256, in order), or None when ``folder`` has
    no manifest. Two sets with the same digest hold the same bytes; a set rebuilt in place gets a new one."""
    mf = Path(folder, MANIFEST)
    if not mf.is_file():
        return None
    shards = json.loads(mf.read_text()).get("shards", [])
    return hashlib.sha256("".join(sh.get("sha256", "") for sh in shards).encode()).hexdigest()[:16]


def code_version() -> str:
    """``uedist <version>`` plus the git commit (and ``-dirty``) when run from a checkout."""
    here = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if rev.returncode == 0 and rev.stdout.strip():
            return f"uedist {__version__} ({rev.stdout.strip()})"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"uedist {__version__}"


def provenance(stage: str, config: Dict[str, Any], parents: List[str] = ()) -> Dict[str, Any]:  # type: ignore[assignment]
    """The provenance block every stage writes: who wrote this set, from what, with which config and code."""
    return {"stage": stage, "config": config, "parents": [str(p) for p in parents], "code_version": code_version()}
