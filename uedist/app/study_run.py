"""Running a planned study (:class:`uedist.app.pipeline.Study`): build its datasets, then run every stage not yet
finished, in the plan's order, each through the one stage runner of every launch script
(:func:`uedist.app.jobs.run_stage`), and leave its ``stage.json`` record.

A stage that stops on bad input (a corrupt shard, a bad config value, a checkpoint of other data) or a non-finite
loss ends the study with the single job's exit code (2 or 3) and a logged message naming the stage (``stage attack
cifar10.lsp: <the shard file>: ...``): :class:`uedist.app.jobs.StageFailed`, which :func:`uedist.app.jobs.guarded`
turns into that code (``launch/pipeline.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List

from uedist.app.jobs import StageFailed, run_stage
from uedist.config import ConfigError, config_to_dict, load_config, save_config
from uedist.dist import get_logger
from uedist.io import atomic_write_json

if TYPE_CHECKING:
    from uedist.app.pipeline import Stage, Study, StudyConfig

log = get_logger("uedist.app.study_run")


def run_study(study: "Study", accelerator: Any) -> List[Dict[str, Any]]:
    """Run every stage of ``study`` not yet finished, in order (the plan's order is a topological order); returns
    the records of the stages it ran or reused. A study folder from before the rename of the ``noise`` kind is
    migrated first (:func:`uedist.app.study_records.migrate_study`). Raises :class:`StageFailed` when a stage stops
    with an exit code."""
    from uedist.app.study_records import migrate_study

    if accelerator.is_main_process:
        moved = migrate_study(study.dir)  # a study folder from before the attack kind's rename
        if moved:
            log.info("study %s: %d stage records from before the rename migrated to attack/", study.cfg.name, moved)
    accelerator.wait_for_everyone()
    build_datasets(study.cfg, accelerator)
    study.plan()  # again: the hashes now include the freshly built sets' content
    states = study.states()
    log.info(
        "study %s: %d stages, %d already done, %d not needed, %d to run",
        study.cfg.name,
        len(study.stages),
        sum(v == "done" for v in states.values()),
        sum(v == "unneeded" for v in states.values()),
        sum(v == "todo" for v in states.values()),
    )
    records = []
    for i, st in enumerate(study.stages):
        where = f"[{i + 1}/{len(study.stages)}] {st.kind} {st.label}"
        if states[st.label] == "unneeded":
            log.info("%s: not needed, every stage that reads it is done", where)
            continue
        if states[st.label] == "done":
            log.info("%s: done earlier, reusing %s", where, st.dir)
            rec = study.record(st)
        else:
            log.info("%s: running in %s", where, st.dir)
            rec = run_study_stage(study, st, accelerator)
        records.append(rec)
    return records


def build_datasets(cfg: "StudyConfig", accelerator: Any) -> None:
    """Build each dataset's train set from its ``build`` config when missing; refuse one that its build config
    would now build differently (e.g. left by an older synthetic generator: never mixed into a study's results)."""
    from uedist.data.build import BuildConfig, build_shard_sets, stale_message

    for dname, ds in cfg.datasets.items():
        if Path(ds.train, "manifest.json").is_file():
            msg = stale_message(load_config(BuildConfig, ds.build), ds.build) if ds.build else ""
            if msg:
                raise ConfigError(f"dataset {dname}: {msg}")
            continue
        if not ds.build:
            raise ConfigError(f"datasets.{dname}.train: {ds.train} has no manifest.json and there is no build config")
        if accelerator.is_main_process:
            log.info("dataset %s: building %s from %s", dname, ds.train, ds.build)
            build_shard_sets(load_config(BuildConfig, ds.build))
        accelerator.wait_for_everyone()
        if not Path(ds.train, "manifest.json").is_file():
            raise ConfigError(f"datasets.{dname}.build: {ds.build} did not produce {ds.train} (check its `out`)")


def run_study_stage(study: "Study", st: "Stage", accelerator: Any) -> Dict[str, Any]:
    """Run one stage of the study through :func:`uedist.app.jobs.run_stage` and write its ``stage.json``."""
    assert st.dir is not None
    if accelerator.is_main_process:
        save_config(st.cfg, st.dir / "config.yaml")
    t0 = time.time()
    summary = run_stage(st.runner, st.cfg, accelerator=accelerator, run_dir=st.dir, where=f"stage {st.kind} {st.label}")
    if isinstance(summary, int):
        raise StageFailed(summary, f"stage {st.kind} {st.label}")
    rec = stage_record(study, st, summary, wall_s=time.time() - t0, world_size=accelerator.num_processes)
    if accelerator.is_main_process:
        atomic_write_json(st.dir / "stage.json", rec)
    accelerator.wait_for_everyone()
    return rec


def stage_record(study: "Study", st: "Stage", summary: Any, *, wall_s: float, world_size: int) -> Dict[str, Any]:
    """What ``stage.json`` holds: the stage, its hash and tags, config, inputs, output, summary and wall time."""
    from uedist.app.pipeline import Stage

    return {
        "kind": st.kind,
        "label": st.label,
        "hash": st.hash,
        "tags": st.tags,
        "method": st.spec.method,
        "wall_s": wall_s,
        "world_size": world_size,
        "config": config_to_dict(st.cfg),
        "inputs": {
            r: (study.output_path(v) if isinstance(v, Stage) else str(v)) for r, v in st.inputs.items() if v is not None
        },
        "output": study.output_path(st) if st.runner.output else "",
        "summary": _jsonable(summary),
    }


def _jsonable(x: Any) -> Any:
    import json

    return json.loads(json.dumps(x, default=str))
