"""Checkpoints that carry everything needed to resume and to rebuild, written atomically, loaded safely.

Layout: ``<run>/checkpoints/step-00001200/{state.pt, rng-rank0.pt, rng-rank1.pt, ...}`` and ``latest`` (a text
file naming the newest complete checkpoint folder). Every rank writes its own RNG file into a temporary folder;
after a barrier the main process writes ``state.pt`` (model, optimizer, scheduler, step, extra state, the
resolved config), renames the folder into place and then rewrites ``latest`` — so ``latest`` only ever names a
complete checkpoint, and a job killed at any moment resumes from the last one. Files load with
``weights_only=True``: a checkpoint cannot run code. Each folder carries ``sha256.json`` (the digest of every file
in it, written before the folder is renamed into place): a file that no longer matches (a flipped byte, a
truncation) is refused, naming it, instead of resuming with damaged weights. When ``latest`` is missing the newest
complete folder is used, with a warning, rather than starting over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch

from uedist.io import atomic_open, atomic_write_text

PathLike = Union[str, os.PathLike]
LATEST = "latest"
DIGESTS = "sha256.json"
log = logging.getLogger(__name__)


def rng_state(gens: Optional[Dict[str, torch.Generator]] = None) -> Dict[str, Any]:
    """This process's RNG states (torch CPU/CUDA, numpy legacy, python, and named generators) as tensors/ints."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": _py_state_to_tensor(random.getstate()),
        "generators": {k: g.get_state() for k, g in (gens or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], gens: Optional[Dict[str, torch.Generator]] = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_py_state_from_tensor(state["python"]))
    for k, g in (gens or {}).items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_tensor(st: Any) -> Dict[str, Any]:
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _py_state_from_tensor(d: Dict[str, Any]) -> Any:
    return (d["version"], tuple(int(v) for v in d["internal"].tolist()), d["gauss"])


class _WriteErrors:
    """A file proxy for ``torch.save`` that keeps the OSError a ``write`` raised: torch's zip writer turns it into
    ``RuntimeError: ... unexpected pos``, which hides that the disk was full."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, b: Any) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _save(obj: Any, path: Path) -> None:
    """``torch.save`` atomically; a full disk is a DiskFull naming ``path`` (via atomic_open), not torch's error."""
    with atomic_open(path, "wb") as f:
        proxy = _WriteErrors(f)
        try:
            torch.save(obj, proxy)
        except RuntimeError:
            if proxy.error is not None:
                raise proxy.error from None
            raise


def save_weights(obj: Dict[str, Any], path: PathLike) -> None:
    """Write a dict of tensors (e.g. ``{"model": state_dict}``) atomically: a reader never sees half a file.
    Read it back with :func:`load_state` (``weights_only=True``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _save(obj, p)


def save_checkpoint(
    ckpt_dir: PathLike,
    step: int,
    state: Dict[str, Any],
    *,
    rank: int,
    barrier: Callable[[], None],
    gens: Optional[Dict[str, torch.Generator]] = None,
    keep: int = 2,
) -> Path:
    """Collective: every rank calls it with the same ``step``. ``state`` (rank 0's is written) holds plain
    tensors/containers: model and optimizer state dicts, scheduler state, counters, config. Keeps the ``keep``
    newest checkpoints."""
    root = Path(ckpt_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    barrier()
    _save(rng_state(gens), tmp / f"rng-rank{rank}.pt")
    barrier()
    if rank == 0:
        _save({**state, "step": step}, tmp / "state.pt")
        digests = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        atomic_write_text(tmp / DIGESTS, json.dumps(digests, indent=1, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root, keep)
    barrier()
    return final


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(f: Path) -> None:
    """Check one file of a checkpoint folder against the folder's ``sha256.json`` (folders written before the
    digests existed have none and are not checked); CheckpointError naming the file when it does not match."""
    table = f.parent / DIGESTS
    if not table.is_file():
        return
    try:
        want = json.loads(table.read_text()).get(f.name)
    except (ValueError, AttributeError):
        raise CheckpointError(f"{table}: damaged digest table (not JSON of file -> sha256)") from None
    if want is None:
        raise CheckpointError(f"{f}: not listed in {table} (a file added to the checkpoint folder afterwards?)")
    if not f.is_file():
        raise CheckpointError(f"{f}: listed in {table} but missing (checkpoint folder damaged)")
    if _sha256(f) != want:
        raise CheckpointError(
            f"{f}: sha256 differs from the one written with the checkpoint (the file is damaged: a changed or "
            "truncated byte); it was not loaded. Delete this step folder to resume from the one before."
        )


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed: a ``latest`` pointer leading elsewhere, a missing or damaged
    ``state.pt``, or a file that is not a uedist checkpoint. The message names the file."""


def latest_checkpoint(ckpt_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint folder, or None. The ``latest`` pointer must name a ``step-*`` folder
    directly inside ``ckpt_dir`` (no path, no ``..``, no symlink out): anything else is refused."""
    root = Path(ckpt_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        done = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "state.pt").is_file())
        if done:  # the pointer was deleted: resume from the newest complete folder, never silently from step 0
            log.warning("%s is missing: resuming from %s, the newest complete checkpoint folder", pointer, done[-1])
            return done[-1]
        return None
    name = pointer.read_text().strip()
    path = root / name
    inside = (
        "/" not in name and "\\" not in name and name.startswith("step-") and path.resolve().parent == root.resolve()
    )
    if not inside:
        raise CheckpointError(f"{pointer}: latest names {name!r}, outside {root} (only a step-* folder in it)")
    if not (path / "state.pt").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which has no state.pt (checkpoint folder damaged)")
    return path


def load_state(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load ``state.pt`` of a checkpoint folder (weights_only: plain tensors and containers only; anything
    else is refused as "not a uedist checkpoint", naming the file, and never unpickled)."""
    return load_weights(Path(path) / "state.pt", map_location)


def load_weights(f: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load one file written by :func:`save_weights` or as a checkpoint's ``state.pt``, weights_only."""
    f = Path(f)
    verify_file(f)
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{f}: no such checkpoint file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError):
        raise CheckpointError(
            f"{f}: not a uedist checkpoint (it holds objects other than tensors and plain containers, or is "
            "damaged); it was not loaded, and should not be"
        ) from None


def restore_rng(path: PathLike, rank: int, gens: Optional[Dict[str, torch.Generator]] = None) -> bool:
    """Restore this rank's RNG from a checkpoint folder; False (RNG left as is) if it was saved by fewer ranks."""
    f = Path(path) / f"rng-rank{rank}.pt"
    if not f.is_file():
        return False
    state = load_weights(f)
    try:
        set_rng_state(state, gens)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{f}: not an RNG state uedist wrote ({type(e).__name__}: {e})") from None
    return True
