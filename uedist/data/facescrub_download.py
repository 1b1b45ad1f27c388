"""Download FaceScrub photos and save the face crops, resumably.

    rows, _ = read_facescrub_meta(["facescrub_actors.txt", "facescrub_actresses.txt"])
    summary = download_facescrub(rows, "data/facescrub_crops", workers=16)

Writes ``<out>/<Identity_Dirname>/<face_id>.jpg`` (or ``.png``): the bbox crop of the photo, RGB, one folder per
identity (``safe_identity_dirname``). Each row goes: fetch (urllib, ``timeout`` per socket operation, retries with
exponential backoff on network errors, timeouts, 5xx, 408 and 429; never on other 4xx) -> sha256 of the bytes
against the metadata -> decode with PIL (first frame; any mode to 8-bit RGB) -> crop to the bbox clipped to the
image -> atomic save (temp file in the same folder, fsync, ``os.replace``). A rerun skips rows whose crop exists
(complete, thanks to the atomic write) and retries everything else.

Every run rewrites ``<out>/failed.tsv`` (``name, face_id, url, reason, detail, source``: the rows without a crop
after this run) and ``<out>/download_summary.json`` (counts, failures by reason, crops per identity, elapsed).
Nothing is written outside ``out_dir``: every target is resolved (symlinks included) and checked with
``os.path.commonpath``. Only http(s) URLs are fetched, also after redirects. One run per ``out_dir`` at a time.

Notes: the bbox applies to the stored pixel array (EXIF orientation is not applied); transparent pixels are
composited over white; 16-bit grey is scaled to 8 bits (/257), not clipped.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union
from urllib.parse import urlsplit

import numpy as np
from PIL import Image
from tqdm import tqdm

from uedist.data.facescrub_meta import FaceRow, safe_identity_dirname, write_tsv_atomic
from uedist.io import TMP_SUFFIX, atomic_open

logger = logging.getLogger(__name__)

FAILED_TSV = "failed.tsv"
SUMMARY_JSON = "download_summary.json"
USER_AGENT = "Mozilla/5.0 (compatible; uedist-facescrub-download)"
_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}
_CHUNK = 1 << 16
_DNS_NOT_FOUND = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)}


class _RowFailure(Exception):
    """This row cannot be done now: ``reason`` is the category counted in the summary, ``detail`` the specifics."""

    def __init__(self, reason: str, detail: str = "", retryable: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


@dataclass(frozen=True)
class Failure:
    """A row without a crop after the run. ``reason`` is a category: ``"http <code>"``, ``"timeout"``,
    ``"network error"``, ``"dns error"``, ``"too large"``, ``"unsupported url scheme"``, ``"bad url"``,
    ``"sha256 mismatch"``, ``"decode error"``, ``"bbox outside image"``, ``"unsafe path"``, ``"bad identity name"``,
    ``"duplicate target"``, ``"save error"`` or ``"internal error"``; ``detail`` says more."""

    name: str
    face_id: int
    url: str
    reason: str
    detail: str
    source: str


@dataclass
class DownloadSummary:
    """What one ``download_facescrub`` run did; ``total == downloaded + skipped_existing + failed``."""

    out_dir: Path
    image_format: str
    total: int
    downloaded: int
    skipped_existing: int
    failures: List[Failure]
    elapsed_s: float
    per_identity: Dict[str, int] = field(default_factory=dict)  # crops present after the run, by folder (0 too)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def failed_by_reason(self) -> Dict[str, int]:
        return dict(sorted(Counter(f.reason for f in self.failures).items()))

    @property
    def failed_tsv(self) -> Path:
        return self.out_dir / FAILED_TSV

    @property
    def summary_json(self) -> Path:
        return self.out_dir / SUMMARY_JSON

    def to_dict(self) -> dict:
        """JSON-ready counts (no per-row failures: those are in ``failed.tsv``)."""
        return {
            "out_dir": str(self.out_dir),
            "image_format": self.image_format,
            "total": self.total,
            "downloaded": self.downloaded,
            "skipped_existing": self.skipped_existing,
            "failed": self.failed,
            "failed_by_reason": self.failed_by_reason,
            "elapsed_s": round(self.elapsed_s, 3),
            "identities": len(self.per_identity),
            "per_identity": self.per_identity,
            "failed_tsv": FAILED_TSV,
        }


@dataclass(frozen=True)
class _Task:
    index: int  # position in the input rows, to report failures in input order
    row: FaceRow
    target: Path


@dataclass(frozen=True)
class _Config:
    out_root: Path
    opener: urllib.request.OpenerDirector
    timeout: float
    retries: int
    backoff: float
    deadline: float
    max_bytes: int
    pil_format: str
    jpeg_quality: int
    verify_sha256: bool


def _http_only_opener() -> urllib.request.OpenerDirector:
    """An opener without file:, ftp: or data: handlers, so neither a URL nor a redirect can read local files."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def is_inside(path: Path, root: Path) -> bool:
    """True if ``path`` resolved (symlinks followed) lies in the already-resolved folder ``root`` (or is it)."""
    return os.path.commonpath([str(path.resolve()), str(root)]) == str(root)


def _failure(row: FaceRow, reason: str, detail: str) -> Failure:
    return Failure(row.name, row.face_id, row.url, reason, detail, row.source)


def _plan(rows: List[FaceRow], out_root: Path, ext: str) -> Tuple[List[_Task], int, List[Tuple[int, Failure]]]:
    """Targets for all rows: ``(tasks to fetch, number already present, rows refused before fetching)``."""
    tasks: List[_Task] = []
    refused: List[Tuple[int, Failure]] = []
    seen: Dict[str, FaceRow] = {}
    skipped = 0
    for index, row in enumerate(rows):
        try:
            target = out_root / safe_identity_dirname(row.name) / f"{row.face_id}.{ext}"
        except ValueError as exc:
            refused.append((index, _failure(row, "bad identity name", str(exc))))
            continue
        key = str(target).casefold()  # case-insensitive file systems would merge these
        if key in seen:
            refused.append((index, _failure(row, "duplicate target", f"same output file as {seen[key].source}")))
            continue
        seen[key] = row
        if not is_inside(target, out_root):
            refused.append((index, _failure(row, "unsafe path", f"{target} resolves outside {out_root}")))
        elif target.is_file():
            skipped += 1
        else:
            tasks.append(_Task(index, row, target))
    return tasks, skipped, refused


def _remove_stale_temp_files(folders: Iterable[Path]) -> None:
    """Temp files left by a killed run (ours only: ``.*.uedist-tmp``) would otherwise pile up."""
    for folder in folders:
        if folder.is_dir():
            for tmp in folder.glob(f".*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)


def _read_body(resp: http.client.HTTPResponse, cfg: _Config, deadline: float) -> bytes:
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > cfg.max_bytes:
        raise _RowFailure("too large", f"Content-Length {length} > max_bytes {cfg.max_bytes}")
    chunks, size = [], 0
    while chunk := resp.read(_CHUNK):
        size += len(chunk)
        if size > cfg.max_bytes:
            raise _RowFailure("too large", f"more than max_bytes {cfg.max_bytes}")
        if time.monotonic() > deadline:
            raise _RowFailure("timeout", f"download took longer than {cfg.deadline:g} s", retryable=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _fetch_once(url: str, cfg: _Config) -> bytes:
    """One attempt; network-level problems raise a retryable ``_RowFailure``."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with cfg.opener.open(request, timeout=cfg.timeout) as resp:
            return _read_body(resp, cfg, time.monotonic() + cfg.deadline)
    except urllib.error.HTTPError as exc:
        exc.close()
        retry = exc.code >= 500 or exc.code in (408, 429)
        raise _RowFailure(f"http {exc.code}", str(exc.reason), retryable=retry) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, socket.gaierror) and exc.reason.errno in _DNS_NOT_FOUND:
            raise _RowFailure("dns error", str(exc.reason)) from None  # the host is gone: retrying cannot help
        if isinstance(exc.reason, TimeoutError):
            raise _RowFailure("timeout", f"no answer within {cfg.timeout:g} s", retryable=True) from None
        if "unknown url type" in str(exc.reason):  # a redirect to file:, ftp:, ...
            raise _RowFailure("unsupported url scheme", str(exc.reason)) from None
        raise _RowFailure("network error", str(exc.reason), retryable=True) from None
    except TimeoutError:
        raise _RowFailure("timeout", f"no answer within {cfg.timeout:g} s", retryable=True) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _RowFailure("network error", f"{type(exc).__name__}: {exc}", retryable=True) from None
    except ValueError as exc:  # http.client.InvalidURL and friends
        raise _RowFailure("bad url", str(exc)) from None


def _fetch_bytes(url: str, cfg: _Config) -> bytes:
    """GET ``url`` with up to ``cfg.retries`` retries, sleeping ``backoff * 2**k`` before retry ``k``."""
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise _RowFailure("unsupported url scheme", url)
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.backoff * 2 ** (attempt - 1))
        try:
            return _fetch_once(url, cfg)
        except _RowFailure as exc:
            if not exc.retryable or attempt == cfg.retries:
                if attempt:
                    exc.detail = f"{exc.detail} (after {attempt + 1} attempts)"
                raise
    raise AssertionError("unreachable")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit RGB, scaled (PIL's convert would clip everything above 255)."""
    arr = np.asarray(img, dtype=np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16") or 255.0 < peak <= 65535.0:
        scale = 255.0 / 65535.0
    elif img.mode == "F" and 0.0 < peak <= 1.0:
        scale = 255.0
    else:
        scale = 1.0 if peak <= 255.0 else 255.0 / peak
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L").convert("RGB")


def image_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit ``RGB``: alpha (RGBA, LA, PA, palette/grey transparency) is composited over white,
    CMYK/YCbCr/1/L/P are converted by PIL, high-depth grey is rescaled to [0, 255]."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _high_depth_to_rgb(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def clip_bbox(bbox: Tuple[int, int, int, int], size: Tuple[int, int]) -> Optional[Tuple[int, int, int, int]]:
    """``(x1, y1, x2, y2)`` clipped to a ``(width, height)`` image; ``None`` if nothing is left."""
    x1, y1, x2, y2 = max(bbox[0], 0), max(bbox[1], 0), min(bbox[2], size[0]), min(bbox[3], size[1])
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def decode_and_crop(data: bytes, bbox: Tuple[int, int, int, int]) -> Image.Image:
    """Decode image bytes (first frame), convert to RGB, crop to ``bbox`` clipped to the image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = image_to_rgb(img)
    # Hostile or broken files make PIL raise many types (OSError, SyntaxError, ValueError, struct.error,
    # DecompressionBombError, ...); each is this row's failure, never the end of a 100k-row download.
    except Exception as exc:
        raise _RowFailure("decode error", f"{type(exc).__name__}: {exc}") from None
    box = clip_bbox(bbox, rgb.size)
    if box is None:
        raise _RowFailure("bbox outside image", f"bbox {bbox} vs image {rgb.size[0]}x{rgb.size[1]}")
    return rgb.crop(box)


def _save_crop(crop: Image.Image, target: Path, cfg: _Config) -> None:
    """Atomic save into ``target``'s folder, refusing any folder that resolves outside ``cfg.out_root``."""
    if not is_inside(target.parent, cfg.out_root):
        raise _RowFailure("unsafe path", f"{target.parent} resolves outside {cfg.out_root}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not is_inside(target.parent, cfg.out_root):  # re-check: the folder may have changed meanwhile
            raise _RowFailure("unsafe path", f"{target.parent} resolves outside {cfg.out_root}")
        options = {"quality": cfg.jpeg_quality} if cfg.pil_format == "JPEG" else {}
        with atomic_open(target, "wb") as fh:
            crop.save(fh, format=cfg.pil_format, **options)
    except OSError as exc:
        raise _RowFailure("save error", f"{type(exc).__name__}: {exc}") from None


def _process(task: _Task, cfg: _Config) -> Optional[Failure]:
    """Fetch, verify, crop and save one row; ``None`` on success, else the recorded ``Failure``."""
    row = task.row
    try:
        data = _fetch_bytes(row.url, cfg)
        if cfg.verify_sha256 and hashlib.sha256(data).hexdigest() != row.sha256:
            raise _RowFailure("sha256 mismatch", f"got {hashlib.sha256(data).hexdigest()} ({len(data)} bytes)")
        _save_crop(decode_and_crop(data, row.bbox), task.target, cfg)
    except _RowFailure as exc:
        return _failure(row, exc.reason, exc.detail)
    except Exception as exc:  # a bug or an odd input must cost one row, and be visible: logged and recorded
        logger.exception("unexpected error on %s (%s)", row.source, row.url)
        return _failure(row, "internal error", f"{type(exc).__name__}: {exc}")
    return None


def _run_tasks(tasks: List[_Task], cfg: _Config, workers: int, *, progress: bool) -> List[Tuple[int, Failure]]:
    """Run all tasks on a thread pool; returns the failures (index, failure)."""
    failures: List[Tuple[int, Failure]] = []
    bar = tqdm(total=len(tasks), disable=not progress, unit="img", desc="facescrub", dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="facescrub-dl")
    try:
        futures = {pool.submit(_process, task, cfg): task for task in tasks}
        for future in as_completed(futures):
            failure = future.result()
            if failure is not None:
                failures.append((futures[future].index, failure))
                logger.debug("%s failed: %s (%s)", failure.source, failure.reason, failure.detail)
            bar.update(1)
            bar.set_postfix(failed=len(failures), refresh=False)
    finally:
        # On Ctrl-C do not wait for the queue: queued rows are cancelled, running ones finish (atomically).
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    return failures


def _count_present(rows: List[FaceRow], out_root: Path, ext: str) -> Dict[str, int]:
    """Crops present per identity folder, 0 for identities of ``rows`` without any."""
    counts: Dict[str, int] = {}
    for row in rows:
        try:
            dirname = safe_identity_dirname(row.name)
        except ValueError:
            continue
        present = (out_root / dirname / f"{row.face_id}.{ext}").is_file()
        counts[dirname] = counts.get(dirname, 0) + int(present)
    return dict(sorted(counts.items()))


def _write_reports(summary: DownloadSummary) -> None:
    records = [(f.name, f.face_id, f.url, f.reason, f.detail, f.source) for f in summary.failures]
    write_tsv_atomic(summary.failed_tsv, ("name", "face_id", "url", "reason", "detail", "source"), records)
    with atomic_open(summary.summary_json, "w") as fh:
        json.dump(summary.to_dict(), fh, indent=2)
        fh.write("\n")


def _check_args(*, workers: int, timeout: float, retries: int, backoff: float, image_format: str, quality: int) -> None:
    if image_format.lower() not in _PIL_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_PIL_FORMATS)}, got {image_format!r}")
    if workers < 1 or timeout <= 0 or retries < 0 or backoff < 0:
        raise ValueError(
            f"need workers >= 1, timeout > 0, retries >= 0, backoff >= 0; got "
            f"{workers}, {timeout}, {retries}, {backoff}"
        )
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {quality}")


def download_facescrub(
    rows: Iterable[FaceRow],
    out_dir: Union[str, "os.PathLike[str]"],
    *,
    workers: int = 16,
    timeout: float = 10.0,
    retries: int = 3,
    backoff: float = 0.5,
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    verify_sha256: bool = True,
    progress: bool = True,
    max_bytes: int = 32 * 2**20,
    deadline: Optional[float] = None,
) -> DownloadSummary:
    """Download, verify and crop FaceScrub rows into ``<out_dir>/<Identity>/<face_id>.<jpg|png>`` (RGB).

    ``timeout``: seconds per socket operation; ``deadline``: seconds per attempt in all (default ``6 * timeout``);
    ``retries``: extra attempts after the first, after ``backoff * 2**k`` s, for network errors, timeouts, 5xx,
    408, 429. ``max_bytes``: larger responses fail (``"too large"``). Rows whose crop exists are skipped; every
    row still without a crop is in ``<out_dir>/failed.tsv``; counts go to ``<out_dir>/download_summary.json``.
    """
    _check_args(
        workers=workers,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        image_format=image_format,
        quality=jpeg_quality,
    )
    started = time.monotonic()
    ext = "jpg" if image_format.lower() in ("jpg", "jpeg") else "png"
    out_root = Path(out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    out_root = out_root.resolve()
    rows = list(rows)
    tasks, skipped, failures = _plan(rows, out_root, ext)
    _remove_stale_temp_files({out_root} | {task.target.parent for task in tasks})
    logger.info("%d rows: %d already present, %d to fetch, %d refused", len(rows), skipped, len(tasks), len(failures))
    cfg = _Config(
        out_root,
        _http_only_opener(),
        timeout,
        retries,
        backoff,
        deadline or 6.0 * timeout,
        max_bytes,
        _PIL_FORMATS[ext],
        jpeg_quality,
        verify_sha256,
    )
    run_failures = _run_tasks(tasks, cfg, workers, progress=progress)
    failures = sorted(failures + run_failures, key=lambda item: item[0])
    summary = DownloadSummary(
        out_dir=out_root,
        image_format=ext,
        total=len(rows),
        downloaded=len(tasks) - len(run_failures),
        skipped_existing=skipped,
        failures=[f for _, f in failures],
        elapsed_s=time.monotonic() - started,
        per_identity=_count_present(rows, out_root, ext),
    )
    _write_reports(summary)
    logger.info(
        "facescrub: %d downloaded, %d present, %d failed %s -> %s",
        summary.downloaded,
        summary.skipped_existing,
        summary.failed,
        summary.failed_by_reason,
        out_root,
    )
    return summary
