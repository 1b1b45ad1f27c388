"""Run a whole study: datasets × attacks × purifiers × victims × modes, resuming whatever is already done.

    accelerate launch launch/pipeline.py --config configs/pipeline/cpu_synthetic.yaml [key=value ...]
    accelerate launch launch/pipeline.py --config ... --plan      # list the stages and which are done; run nothing
    python launch/pipeline.py --config ... --print-config        # the resolved study config as YAML; run nothing

Exit codes, as every launch script: 2 = bad config or input (a corrupt shard of a set a stage reads, ...), 3 = a
non-finite loss stopped a stage; the logged message names the stage (``stage attack cifar10.lsp: ...``).

Writes runs/<study>/: study.yaml (resolved), study.json (the stage list), <kind>/<label>-<hash>/ per stage (its
config.yaml, outputs, stage.json when finished), logs/, and report/ (results table, plots, grids, timing).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import uedist.models  # noqa: F401  (registers the model zoo)
from uedist.app.jobs import from_main, guarded
from uedist.app.pipeline import Study, load_study
from uedist.app.report import write_report
from uedist.app.stages import print_config
from uedist.app.study_records import legacy_stage_folders
from uedist.config import ConfigError, save_config
from uedist.dist import get_logger, make_accelerator, setup_logging
from uedist.io import RunInUse, atomic_write_json, hold_lock

log = get_logger("uedist.launch.pipeline")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML (configs/pipeline/)")
    p.add_argument("--plan", action="store_true", help="print the stages (done / to run) and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved study config as YAML and exit")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. name=my_study modes=[standard]")
    args = p.parse_args(argv)
    try:
        cfg = load_study(args.config, args.overrides)
        if args.print_config:
            return print_config(cfg)
        study = Study(cfg)
    except ConfigError as e:
        p.error(str(e))
    if args.plan:
        old = legacy_stage_folders(study.dir)
        if old:  # listed as todo here; the run migrates them first (uedist report --migrate does it now)
            print(
                f"note: {len(old)} stage folders under {study.dir}/noise/ from before the attack rename: the run "
                f"moves them to attack/ and reuses them (or: uedist report {study.dir} --migrate)",
                file=sys.stderr,
            )
        states = study.states()  # done / todo / unneeded (not built: every stage that reads it is done)
        for st in study.stages:
            print(f"{states[st.label]:8s}  {st.kind:7s} {st.label:50s} {st.dir}")
        return 0
    try:
        accelerator = make_accelerator()
    except ConfigError as e:  # e.g. a bad UEDIST_COLLECTIVE_TIMEOUT
        p.error(str(e))
    problem = None
    if accelerator.is_main_process:  # a second study into the same folder is refused, not interleaved
        try:
            hold_lock(study.dir, what="study")
        except RunInUse as e:
            problem = str(e)
    problem = from_main(problem, accelerator)  # every rank stops alike
    if problem:
        log.error("%s", problem)
        return 2
    setup_logging(study.dir)

    def write_stage_list() -> None:
        if accelerator.is_main_process:
            atomic_write_json(
                study.dir / "study.json",
                {"name": cfg.name, "stages": [str(st.dir.relative_to(study.dir)) for st in study.stages]},
            )  # type: ignore[union-attr]

    if accelerator.is_main_process:
        save_config(cfg, study.dir / "study.yaml")
    write_stage_list()
    # every stage runs through the one stage runner of the launch scripts: bad input (a corrupt shard, a set from an
    # older generator) exits 2 and a non-finite loss 3, the logged message naming the stage and the culprit
    rc = guarded(lambda: study.run(accelerator), log)
    if isinstance(rc, int):
        return rc
    write_stage_list()  # again: building the datasets may have changed the stages' hashes
    if accelerator.is_main_process:
        print(f"\nstudy {cfg.name}: {len(study.stages)} stages done in {study.dir}")
        if cfg.report:
            written = write_report(study.dir)
            print(written.pop("markdown"))
            for name, path in written.items():
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
