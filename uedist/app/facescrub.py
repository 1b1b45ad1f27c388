"""``uedist facescrub download`` (and launch/facescrub_download.py): download the FaceScrub photos listed in the
official metadata files and save the face crops (needs internet).

    python launch/facescrub_download.py --meta facescrub_actors.txt facescrub_actresses.txt \\
        --out data/facescrub_crops [--workers 16 --timeout 10 --retries 3 --format jpg --skip-bad-rows --min-images 50]

Writes ``<out>/<Identity>/<face_id>.jpg`` (the layout the Facescrub identity-folder source reads),
``<out>/failed.tsv`` (rows without a crop, with the reason), ``<out>/download_summary.json`` and
``<out>/bad_metadata_rows.tsv`` (metadata lines skipped by --skip-bad-rows). Run the same command again to resume:
crops already present are skipped, failed rows are retried. One run per --out folder at a time.

Exit status: 0 done (some rows may have failed: see failed.tsv); 1 an identity has fewer than --min-images crops;
2 bad arguments or a bad metadata row (without --skip-bad-rows).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from uedist.data.facescrub_download import download_facescrub
from uedist.data.facescrub_meta import FacescrubMetadataError, read_facescrub_meta, write_bad_rows_tsv

BAD_ROWS_TSV = "bad_metadata_rows.tsv"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--meta", nargs="+", required=True, type=Path, help="facescrub_actors.txt facescrub_actresses.txt")
    p.add_argument("--out", required=True, type=Path, help="crops folder: <out>/<Identity>/<face_id>.<format>")
    p.add_argument("--workers", type=int, default=16, help="parallel downloads")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per socket operation")
    p.add_argument("--retries", type=int, default=3, help="extra attempts on network errors, timeouts, 5xx")
    p.add_argument("--backoff", type=float, default=0.5, help="seconds before the first retry, doubling after")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="crop file format")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--no-verify-sha256", action="store_true", help="keep photos whose bytes differ from the metadata")
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help=f"skip malformed rows and bad bboxes, listing them in <out>/{BAD_ROWS_TSV}",
    )
    p.add_argument("--min-images", type=int, default=0, metavar="K", help="exit 1 if an identity has < K crops")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _say(text: str, *, err: bool = False) -> None:
    """The command's own report lines, bare on stdout (errors on stderr), as the ``uedist`` CLI writes its product."""
    (sys.stderr if err else sys.stdout).write(text + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    """Parse the metadata, download and crop, print where everything went; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rows, bad = read_facescrub_meta(args.meta, skip_bad=args.skip_bad_rows)
    except (FacescrubMetadataError, OSError) as exc:
        _say(f"error: {exc}\n(--skip-bad-rows skips such rows and lists them in <out>/{BAD_ROWS_TSV})", err=True)
        return 2
    bad_tsv = write_bad_rows_tsv(bad, args.out / BAD_ROWS_TSV)
    try:
        summary = download_facescrub(
            rows,
            args.out,
            workers=args.workers,
            timeout=args.timeout,
            retries=args.retries,
            backoff=args.backoff,
            image_format=args.format,
            jpeg_quality=args.jpeg_quality,
            verify_sha256=not args.no_verify_sha256,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        _say(f"error: {exc}", err=True)
        return 2
    present = sum(summary.per_identity.values())
    _say(
        f"{present} crops of {len(summary.per_identity)} identities in {summary.out_dir}/<Identity>/"
        f"<face_id>.{summary.image_format} ({summary.downloaded} new, {summary.skipped_existing} already there)"
    )
    _say(f"{summary.failed} of {summary.total} rows failed {summary.failed_by_reason}: {summary.failed_tsv}")
    _say(f"{len(bad)} bad metadata rows skipped: {bad_tsv}")
    _say(f"summary: {summary.summary_json} ({summary.elapsed_s:.1f} s)")
    below = {name: n for name, n in summary.per_identity.items() if n < args.min_images}
    if below:
        _say(f"{len(below)} identities have fewer than {args.min_images} crops: {below}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
