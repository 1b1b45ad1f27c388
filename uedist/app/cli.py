"""The ``uedist`` command.

uedist shards build   --config configs/shards/cifar10.yaml [key=value ...] [--print-config]
uedist shards verify  SHARD_SET [--decode]
uedist shards inspect SHARD_SET [--out samples.png] [--per-class 8]
uedist shards to-ffcv SHARD_SET [--out data.beton]
uedist facescrub download --meta A.txt B.txt --out data/facescrub_crops
uedist report runs/<study> [--out DIR] [--records DIR]
uedist submit launch/<job>.py --config X [key=value ...] --nodes N --gpus-per-node G --time T [--sbatch-only]
uedist stages                      # every registered stage: kind, config schema, inputs, output
uedist stages NAME                 # every config key of stage NAME: type, default, range, help
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from uedist.config import ConfigError, load_config, save_config
from uedist.dist import setup_logging
from uedist.io import RunInUse

log = logging.getLogger("uedist.app.cli")


def _output(text: str) -> None:
    """The command's own product (a summary table, a report), written bare to stdout so it can be piped; status
    lines go through ``log`` instead (rank-aware, timestamped, like every job's)."""
    sys.stdout.write(text.rstrip("\n") + "\n")


def _build(args: argparse.Namespace) -> int:
    from uedist.data.build import BuildConfig, build_shard_sets, default_out

    cfg = load_config(BuildConfig, args.config, args.overrides)
    if args.print_config:
        from uedist.app.stages import print_config

        return print_config(cfg)
    out = default_out(cfg)
    manifests = build_shard_sets(cfg, progress=not args.no_progress)
    save_config(cfg, out / "build_config.yaml")
    for split, m in manifests.items():
        log.info(
            f"{out / split}: {m.num_samples} samples, {m.num_classes} classes, {m.image_size[0]}x{m.image_size[1]} "
            f"{m.encoding}, {len(m.shards)} shards" + (f", {len(m.skipped)} skipped" if m.skipped else "")
        )
    log.info(f"resolved config: {out / 'build_config.yaml'}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from uedist.data.shards import verify_shard_set

    rc = 0
    for folder in args.shard_sets:
        rep = verify_shard_set(folder, decode=args.decode)
        if rep.ok:
            log.info(
                f"OK   {folder}: {rep.num_samples} samples, every shard's count and sha256 match"
                + (", every image decodes" if args.decode else "")
            )
        else:
            rc = 1
            log.error(f"FAIL {folder}: {len(rep.problems)} problem(s)")
            for p in rep.problems:
                log.error(f"  - {p}")
    return rc


def _inspect(args: argparse.Namespace) -> int:
    from uedist.data.inspect import sample_grid, summarize
    from uedist.data.manifest import load_manifest

    m = load_manifest(args.shard_set)
    _output(summarize(m, args.shard_set))
    path = sample_grid(args.shard_set, per_class=args.per_class, max_classes=args.max_classes, out=args.grid)
    log.info(f"sample grid {path}")
    return 0


def _to_ffcv(args: argparse.Namespace) -> int:
    from uedist.data.ffcv_io import convert_to_beton, sidecar_path

    try:
        path = convert_to_beton(args.shard_set, args.out, num_workers=args.workers)
    except ImportError as e:  # ffcv is an optional extra
        sys.stderr.write(f"error: {e}\n")
        return 2
    log.info(f"{path} and its provenance {sidecar_path(path).name} match {args.shard_set} (data.format=ffcv reads it)")
    return 0


def _facescrub_download(args: argparse.Namespace) -> int:
    from uedist.app.facescrub import main as fs_main

    return fs_main(args.rest)


def _submit(args: argparse.Namespace) -> int:
    from uedist.app.submit import main as submit_main

    return submit_main(args.rest)


def _report(args: argparse.Namespace) -> int:
    from uedist.app.report import write_report

    if args.migrate:
        from uedist.app.study_records import migrate_study

        if not args.study.is_dir():
            raise FileNotFoundError(f"no study folder {args.study}")
        log.info(f"{args.study}: {migrate_study(args.study)} stage folders migrated (noise/ -> attack/)")
        return 0
    written = write_report(args.study, args.out)
    _output(written.pop("markdown"))
    for path in written.values():
        log.info(f"wrote {path}")
    if args.records:
        from uedist.app.report import export_records

        stages = export_records(args.study, args.records)
        log.info(f"wrote the records of {len(stages)} finished stages to {args.records}")
    return 0


def _stages(args: argparse.Namespace) -> int:
    from uedist.app.stages import describe_stage, stage_table
    from uedist.registry import RegistryError

    if args.name:
        try:
            _output(describe_stage(args.name))
        except RegistryError as e:  # an unknown name: the message lists the known stages
            sys.stderr.write(f"error: {e}\n")
            return 2
        return 0
    rows = stage_table()
    head = ["stage", "kind", "config schema", "inputs", "output", "what it does"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    _output("\n".join(lines))
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uedist", description="unlearnable examples at scale: data tools, reports, the stage registry"
    )
    sub = p.add_subparsers(dest="group", required=True)
    shards = sub.add_parser("shards", help="build, verify and inspect shard sets").add_subparsers(
        dest="cmd", required=True
    )

    b = shards.add_parser("build", help="turn a source dataset into shard sets (one per split)")
    b.add_argument("--config", help="YAML config (see configs/shards/)")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    b.add_argument("overrides", nargs="*", help="key=value overrides, e.g. cifar.root=/data/cifar-10-batches-py")
    b.set_defaults(fn=_build)

    v = shards.add_parser("verify", help="check every shard's count and sha256 against the manifest")
    v.add_argument("shard_sets", nargs="+")
    v.add_argument("--decode", action="store_true", help="also decode every image")
    v.set_defaults(fn=_verify)

    i = shards.add_parser("inspect", help="print a summary and write a PNG grid of samples per class")
    i.add_argument("shard_set")
    i.add_argument(
        "--out",
        "--grid",
        dest="grid",
        help="PNG path of the sample grid (default: runs/inspect/<parent>_<set>/samples.png; never inside the set)",
    )
    i.add_argument("--per-class", type=int, default=8)
    i.add_argument("--max-classes", type=int, default=20)
    i.set_defaults(fn=_inspect)

    f = shards.add_parser("to-ffcv", help="convert a shard set to an FFCV .beton (needs the ffcv extra)")
    f.add_argument("shard_set")
    f.add_argument("--out", help="default: <shard_set>/data.beton")
    f.add_argument("--workers", type=int, default=2)
    f.set_defaults(fn=_to_ffcv)

    fs = sub.add_parser("facescrub", help="Facescrub tools").add_subparsers(dest="cmd", required=True)
    d = fs.add_parser("download", help="download + crop Facescrub from its metadata files", add_help=False)
    d.add_argument("rest", nargs=argparse.REMAINDER)
    d.set_defaults(fn=_facescrub_download)

    # prefix_chars "+": every argument, --help and the options included, goes on to uedist.app.submit's own parser
    sb = sub.add_parser("submit", help="a launch script or study as a SLURM job", add_help=False, prefix_chars="+")
    sb.add_argument("rest", nargs=argparse.REMAINDER)
    sb.set_defaults(fn=_submit)

    r = sub.add_parser("report", help="results table (CSV + Markdown), plots, grids and timing of a study folder")
    r.add_argument("study", type=Path, help="runs/<study> (written by launch/pipeline.py)")
    r.add_argument("--out", type=Path, help="default: <study>/report")
    r.add_argument(
        "--records",
        type=Path,
        help="also copy every finished stage's records (stage.json, config.yaml, metrics.json, curve.csv; no shard "
        "sets) to RECORDS/<kind>/<stage>/: copied into runs/<study>/ on another machine, the pipeline reuses them",
    )
    r.add_argument(
        "--migrate",
        action="store_true",
        help="only move and rewrite the stage records of a study folder (or of a records folder) written before the "
        "stage kind noise became attack: noise/ -> attack/, kind, tags and paths; idempotent (launch/pipeline.py "
        "does it to its own folder)",
    )
    r.set_defaults(fn=_report)

    st = sub.add_parser("stages", help="list every registered stage (attacks, purifiers, victim, DDPM)")
    st.add_argument("name", nargs="?", help="one stage: every key of its config with type, default, range and help")
    st.set_defaults(fn=_stages)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    setup_logging()
    try:
        return args.fn(args)
    except (ConfigError, FileExistsError, FileNotFoundError, RunInUse) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except ValueError as e:  # SourceError, ManifestError, ShardError, CorruptImageError: all name the culprit
        sys.stderr.write(f"error: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
