"""Atomic file writes: write to a temporary name in the same folder, fsync, then ``os.replace``.

A reader never sees half a file: either the old content (or nothing) or the new, complete content.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, Optional, Tuple, Union

PathLike = Union[str, os.PathLike]
TMP_SUFFIX = ".tmp"  # temp files are ".<final name>.<random>.tmp" beside the final file
_FILE_MODE = 0o644  # mkstemp's 0600 would hide shared datasets from colleagues


class RunInUse(RuntimeError):
    """Another live process holds the lock of a run, study or shard-set folder; the message names the folder and
    the holder (pid, host, since when)."""


_HELD_LOCKS: Dict[str, int] = {}


def hold_lock(folder: PathLike, *, what: str) -> None:
    """Take the exclusive lock of ``folder`` (``folder/.lock``, a POSIX record lock, non-blocking) for the rest of
    this process, or raise :class:`RunInUse` naming its holder. The kernel drops it when the process ends, however
    it ends, so a killed job never leaves a stale lock; unlike ``flock`` it is not shared with forked children (a
    DataLoader worker that outlives its killed job for a moment does not hold the run). Taking a lock this process
    already holds is a no-op; nothing else in the process may open ``.lock`` (closing any descriptor of it would
    drop a POSIX lock)."""
    import datetime
    import fcntl
    import socket

    path = Path(folder) / ".lock"
    if str(path.resolve()) in _HELD_LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise RunInUse(
            f"{what} {folder} is in use by {holder}: two jobs writing one folder would mix their files; wait for "
            "it to end, or use another name"
        ) from None
    now = datetime.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now}\n".encode(), 0)
    _HELD_LOCKS[str(path.resolve())] = fd


def release_lock(folder: PathLike) -> None:
    """Drop a lock :func:`hold_lock` took in this process (tests; a job keeps its lock until it exits)."""
    fd = _HELD_LOCKS.pop(str((Path(folder) / ".lock").resolve()), None)
    if fd is not None:
        os.close(fd)


class DiskFull(OSError):
    """A write that ran out of space (ENOSPC) or quota (EDQUOT); the message names the file (``write()``'s own
    error does not). The partial temp file is removed; the destination is untouched."""


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path`` (text: UTF-8, ``\\n``); on success fsync it and ``os.replace`` it onto
    ``path``, so ``path`` is either absent, the old file, or the complete new file. On error the temp file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        binary = "b" in mode
        with os.fdopen(fd, mode, encoding=None if binary else "utf-8", newline=None if binary else "\n") as fh:
            os.chmod(tmp, _FILE_MODE)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, DiskFull) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(e.errno, f"{path}: no space left on device (nothing written; free space and rerun)") from e
        raise


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path``, then rename it to ``path``."""
    with atomic_open(path, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# numpy's array reconstruction: the only globals a pickle of plain numpy arrays needs
NUMPY_ARRAY_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }
)


def restricted_unpickle(
    f: Any, *, allowed: Any, what: str, encoding: str = "ASCII", replace: Optional[Dict[Tuple[str, str], Any]] = None
) -> Any:
    """Unpickle ``f`` admitting only the (module, name) globals in ``allowed``; any other is refused, naming it
    and ``what`` the file is (pickle.UnpicklingError), and never imported or called. ``replace`` maps an admitted
    global to a checked stand-in (e.g. a ``bytearray`` that refuses a size argument)."""
    import pickle

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if replace and (module, name) in replace:
                return replace[(module, name)]
            if (module, name) in allowed:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from {what}")

    return _Restricted(f, encoding=encoding).load()
