"""WebDataset tar shards: deterministic writing, verified reading, and resumable shard-set writing.

A sample in a shard is the tar members ``<key>.<ext>`` (image: jpg / png / npy), ``<key>.cls`` (decimal label)
and optionally ``<key>.src`` (where it came from), consecutive, as WebDataset expects. Tar headers carry no
time, owner or permissions that vary, so the same samples give byte-identical shards.

Reading never unpickles and never extracts to disk: members are parsed from memory, names must be plain keys,
and (by default) the shard's sha256 is checked against the manifest before any sample is handed out.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from uedist.data.images import ENCODINGS
from uedist.data.manifest import MANIFEST, Manifest, ManifestError, ShardInfo, load_manifest
from uedist.io import atomic_write, atomic_write_json, sha256_file

PathLike = Union[str, os.PathLike]
KEY_WIDTH = 8
PROGRESS = "_progress"


class ShardError(ValueError):
    """A missing, truncated, altered or malformed shard; the message names the shard file."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def format_key(index: int) -> str:
    """Stable zero-padded global sample index; unchanged through every stage."""
    return f"{index:0{KEY_WIDTH}d}"


@dataclass
class Sample:
    """One sample as stored: encoded image bytes and its extension, label, extra fields (e.g. ``src``)."""

    key: str
    label: int
    ext: str
    data: bytes
    extras: Dict[str, bytes] = field(default_factory=dict)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def write_tar(fileobj: Any, samples: Iterable[Sample]) -> Tuple[int, Optional[str], Optional[str]]:
    """Write samples to an open binary file as a tar; returns (count, first_key, last_key)."""
    count, first, last = 0, None, None
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            if s.ext not in ENCODINGS:
                raise ValueError(f"sample {s.key}: unknown image extension {s.ext!r}")
            members = [(f"{s.key}.cls", str(int(s.label)).encode())]
            members.append((f"{s.key}.{s.ext}", s.data))
            members += [(f"{s.key}.{k}", v) for k, v in sorted(s.extras.items())]
            for name, data in members:
                tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
            count += 1
            first = first or s.key
            last = s.key
    return count, first, last


class _NotPlainUstar(Exception):
    """The tar uses features the fast parser leaves to ``tarfile`` (pax / GNU long names, links, ...)."""


def _fast_members(data: bytes, name: str) -> Iterator[Tuple[str, bytes]]:
    """(member name, payload) of a plain ustar/GNU tar of regular files, parsing the 512-byte headers directly
    (``tarfile`` spends more time on headers than PNG decoding takes at 32 px). Raises _NotPlainUstar for
    anything else and ShardError for a truncated or corrupt header."""
    view, pos, n = memoryview(data), 0, len(data)
    while pos + 512 <= n:
        hdr = view[pos : pos + 512]
        if hdr[0] == 0:  # end-of-archive block
            return
        try:
            chk = int(bytes(hdr[148:156]).split(b"\0", 1)[0].strip() or b"0", 8)
            size = int(bytes(hdr[124:136]).split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise _NotPlainUstar() from None  # base-256 sizes etc.
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise ShardError(f"{name}: corrupt tar header at byte {pos}")
        if hdr[156] not in (0x30, 0):  # '0' or NUL: regular file
            raise _NotPlainUstar()
        member = bytes(hdr[0:100]).split(b"\0", 1)[0]
        prefix = bytes(hdr[345:500]).split(b"\0", 1)[0] if bytes(hdr[257:262]) == b"ustar" else b""
        if prefix:
            member = prefix + b"/" + member
        start = pos + 512
        if start + size > n:
            raise ShardError(f"{name}: member {member.decode(errors='replace')!r} is truncated")
        yield member.decode("utf-8"), data[start : start + size]
        pos = start + (size + 511) // 512 * 512
    # Falling out of the loop means no end-of-archive block: cut off (possibly exactly between members).
    raise ShardError(f"{name}: truncated tar (no end-of-archive marker)")


def _tarfile_members(data: bytes, name: str) -> Iterator[Tuple[str, bytes]]:
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        for ti in tar:
            if not ti.isfile():
                raise ShardError(f"{name}: member {ti.name!r} is not a regular file")
            f = tar.extractfile(ti)
            payload = f.read() if f is not None else b""
            if len(payload) != ti.size:
                raise ShardError(f"{name}: member {ti.name!r} is truncated")
            yield ti.name, payload
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{name}: truncated or corrupt tar ({type(e).__name__}: {e})") from e


def _members(data: bytes, name: str) -> Iterator[Tuple[str, bytes]]:
    try:
        members = list(_fast_members(data, name))
    except _NotPlainUstar:
        members = None
    yield from members if members is not None else _tarfile_members(data, name)


def parse_tar(data: bytes, name: str) -> Iterator[Sample]:
    """Parse shard bytes into samples (in file order). Member names must be ``<key>.<field>``; errors name the
    shard. Nothing is extracted to disk and nothing is unpickled."""
    current: Optional[Dict[str, Any]] = None
    for base, payload in _members(data, name):
        if "/" in base or "\\" in base or base.startswith(".") or "." not in base:
            raise ShardError(f"{name}: member name {base!r} is not '<key>.<field>'")
        key, fld = base.split(".", 1)
        if current is None or current["key"] != key:
            if current is not None:
                yield _finish(current, name)
            current = {"key": key, "fields": {}}
        if fld in current["fields"]:
            raise ShardError(f"{name}: key {key} appears twice (its {fld} field is stored twice in a row)")
        current["fields"][fld] = payload
    if current is not None:
        yield _finish(current, name)


def _finish(cur: Dict[str, Any], name: str) -> Sample:
    fields: Dict[str, bytes] = cur["fields"]
    key = cur["key"]
    if "cls" not in fields:
        raise ShardError(f"{name}: sample {key} has no .cls field")
    try:
        label = int(fields.pop("cls").decode())
    except ValueError as e:
        raise ShardError(f"{name}: sample {key} has a malformed label") from e
    exts = [e for e in ENCODINGS if e in fields]
    if len(exts) != 1:
        raise ShardError(
            f"{name}: sample {key} needs exactly one image field ({'/'.join(ENCODINGS)}), has {sorted(fields)}"
        )
    data = fields.pop(exts[0])
    return Sample(key, label, exts[0], data, fields)


_VERIFIED: set = set()  # (path, inode, size, mtime_ns, sha256) of the shards this process has verified


def read_shard(
    folder: PathLike, info: ShardInfo, *, verify: bool = True, num_classes: Optional[int] = None
) -> Iterator[Sample]:
    """Samples of one shard of a set. The file must be a regular file of the manifest's size (checked before a
    byte is read, and read no further than that size: a shard linked to ``/dev/zero`` or a FIFO cannot exhaust
    memory or block). With ``verify`` the whole file is checked (sha256, count) before the first sample is
    returned, so a truncated or altered shard never feeds a single sample to training. Every sample's key must
    follow the previous one and lie in the manifest's ``first_key``..``last_key``; with ``num_classes`` its label
    must be in 0..num_classes-1. Every problem is a ShardError naming the shard (and the sample)."""
    path = Path(folder) / info.name
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ShardError(f"{path}: shard listed in the manifest is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise ShardError(f"{path}: not a regular file (a device, FIFO or folder where a shard should be)")
    if st.st_size != info.bytes:
        raise ShardError(f"{path}: {st.st_size} bytes, manifest says {info.bytes} (truncated or altered)")
    with open(path, "rb") as f:
        data = f.read(info.bytes + 1)
    if len(data) != info.bytes:
        raise ShardError(f"{path}: {len(data)} bytes read, manifest says {info.bytes} (changed while read)")
    # a shard this process verified unchanged since (same inode, size and mtime) is not hashed again: the training
    # stream revisits shards, and every loader worker reads every visit of its rank
    seen = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, info.sha256)
    if verify and seen not in _VERIFIED:
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise ShardError(
                f"{path}: sha256 {digest[:12]}… does not match the manifest ({info.sha256[:12]}…): altered"
            )
        if len(_VERIFIED) > 100_000:  # bounded: a process reading that many shards starts over
            _VERIFIED.clear()
        _VERIFIED.add(seen)
    checked = _checked_samples(data, path, info, num_classes=num_classes)
    # verified: every sample (count, keys, labels) is checked before the first one is handed out
    yield from list(checked) if verify else checked


def _checked_samples(data: bytes, path: Path, info: ShardInfo, *, num_classes: Optional[int]) -> Iterator[Sample]:
    n, prev = 0, None
    for s in parse_tar(data, str(path)):
        _check_sample(s, path, info, prev=prev, num_classes=num_classes)
        n, prev = n + 1, s.key
        yield s
    if n != info.count:
        raise ShardError(f"{path}: {n} samples, manifest says {info.count}")
    if prev is not None and info.last_key is not None and prev != info.last_key:
        raise ShardError(f"{path}: last key {prev}, manifest says {info.last_key}")


def _check_sample(s: Sample, path: Path, info: ShardInfo, *, prev: Optional[str], num_classes: Optional[int]) -> None:
    if prev is None and info.first_key is not None and s.key != info.first_key:
        raise ShardError(f"{path}: first key {s.key}, manifest says {info.first_key}")
    if prev is not None and s.key <= prev:
        what = "appears twice" if s.key == prev else f"comes after {prev} (keys are written in order)"
        raise ShardError(f"{path}: key {s.key} {what}")
    if num_classes is not None and not 0 <= s.label < num_classes:
        raise ShardError(
            f"{path}: sample {s.key} has label {s.label}, outside 0..{num_classes - 1} (the manifest lists "
            f"{num_classes} classes)"
        )


def iter_samples(folder: PathLike, *, verify: bool = True, manifest: Optional[Manifest] = None) -> Iterator[Sample]:
    """Every sample of a shard set, in shard then key order."""
    m = manifest or load_manifest(folder)
    for info in m.shards:
        yield from read_shard(folder, info, verify=verify, num_classes=m.num_classes)


@dataclass
class VerifyReport:
    folder: str
    num_samples: int
    problems: List[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shard_set(folder: PathLike, *, decode: bool = False) -> VerifyReport:
    """Check every shard's presence, size, sha256 and sample count (and, with ``decode``, every image)."""
    from uedist.data.images import CorruptImageError, decode_image

    m = load_manifest(folder)
    problems: List[str] = []
    total = 0
    keys_seen: Dict[str, str] = {}
    labels = [0] * m.num_classes
    for info in m.shards:
        try:
            for s in read_shard(folder, info, verify=True, num_classes=m.num_classes):
                total += 1
                if s.key in keys_seen:
                    problems.append(f"{info.name}: key {s.key} is also in {keys_seen[s.key]}")
                keys_seen[s.key] = info.name
                labels[s.label] += 1
                if decode:
                    decode_image(s.data, s.ext, m.image_size, name=f"{info.name}:{s.key}")
        except (ShardError, CorruptImageError) as e:
            problems.append(str(e))
    if not problems and total != m.num_samples:
        problems.append(f"read {total} samples, manifest says {m.num_samples}")
    if not problems and m.class_counts and labels != m.class_counts:
        problems.append(f"class_counts {m.class_counts[:10]} differ from the labels read {labels[:10]}")
    return VerifyReport(str(folder), total, problems)


class ShardSetWriter:
    """Writes a shard set shard by shard, atomically and resumably.

    Each shard goes to a temporary name and is renamed when complete; then a record of it (count, sha256,
    fingerprint) goes to ``_progress/``. A rerun with the same ``fingerprint`` (a hash of what is being built)
    skips shards whose record and file still match; anything else is rebuilt. ``finalize`` writes the manifest
    last and removes ``_progress``. Used by ingest and by every shard map pass.
    """

    def __init__(self, folder: PathLike, fingerprint: str, *, overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.progress = self.folder / PROGRESS
        fp_file = self.progress / "fingerprint"
        if (self.folder / MANIFEST).exists():
            if not overwrite:
                raise FileExistsError(
                    f"{self.folder} already holds a finished shard set (manifest.json); "
                    "pass overwrite=true to rebuild it, or choose another output folder"
                )
        if overwrite and self.folder.exists():
            self._clear()
        if self.progress.is_dir() and fp_file.is_file() and fp_file.read_text() != fingerprint:
            raise FileExistsError(
                f"{self.folder} holds an unfinished build of different inputs/settings; "
                "pass overwrite=true to discard it, or choose another output folder"
            )
        self.progress.mkdir(parents=True, exist_ok=True)
        if not fp_file.is_file():
            atomic_write(fp_file, lambda f: f.write(fingerprint.encode()))

    @classmethod
    def attach(cls, folder: PathLike, fingerprint: str) -> "ShardSetWriter":
        """A writer for a worker process: the folder was prepared by ``ShardSetWriter(...)`` in the parent."""
        self = cls.__new__(cls)
        self.folder, self.fingerprint, self.progress = Path(folder), fingerprint, Path(folder) / PROGRESS
        return self

    def _clear(self) -> None:
        for p in self.folder.iterdir():
            if p.name == MANIFEST or p.name == PROGRESS or (p.name.startswith("shard-") and p.suffix == ".tar"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _record_path(self, index: int) -> Path:
        return self.progress / f"{shard_name(index)}.json"

    def done(self, index: int) -> Optional[Dict[str, Any]]:
        """The record of shard ``index`` if it is complete and its file still matches; else None."""
        rec_path = self._record_path(index)
        path = self.folder / shard_name(index)
        if not (rec_path.is_file() and path.is_file()):
            return None
        try:
            rec = json.loads(rec_path.read_text())
        except json.JSONDecodeError:
            return None
        if rec.get("fingerprint") != self.fingerprint or rec["shard"]["bytes"] != path.stat().st_size:
            return None
        if sha256_file(path) != rec["shard"]["sha256"]:
            return None
        return rec

    def write_shard(self, index: int, samples: Iterable[Sample], **extra: Any) -> Dict[str, Any]:
        """Write shard ``index`` from ``samples``; ``extra`` (JSON-able) is kept in its record."""
        path = self.folder / shard_name(index)
        self._remove_temps(f".{shard_name(index)}.*.tmp")  # left by a killed writer of this shard
        stats: Dict[str, Any] = {}

        def write(f: Any) -> None:
            stats["count"], stats["first"], stats["last"] = write_tar(f, samples)

        atomic_write(path, write)
        info = ShardInfo(
            shard_name(index), stats["count"], sha256_file(path), path.stat().st_size, stats["first"], stats["last"]
        )
        rec = {"fingerprint": self.fingerprint, "shard": asdict(info), **extra}
        atomic_write_json(self._record_path(index), rec)
        return rec

    def finalize(self, manifest: Manifest) -> Path:
        """Write ``manifest.json`` (last), then drop the progress records. Returns the manifest path."""
        path = manifest.save(self.folder)
        shutil.rmtree(self.progress, ignore_errors=True)
        self._remove_temps(".shard-*.tmp")
        return path

    def _remove_temps(self, pattern: str) -> None:
        for p in self.folder.glob(pattern):
            p.unlink(missing_ok=True)


def shard_info_from_record(rec: Dict[str, Any]) -> ShardInfo:
    return ShardInfo(**rec["shard"])


__all__ = [
    "Sample",
    "ShardError",
    "ShardSetWriter",
    "ManifestError",
    "iter_samples",
    "read_shard",
    "parse_tar",
    "write_tar",
    "verify_shard_set",
    "VerifyReport",
    "shard_name",
    "format_key",
    "shard_info_from_record",
]
