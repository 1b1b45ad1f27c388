"""Running a planned study (:class:`uedist.app.pipeline.Study`): build its datasets, then run every stage not yet
finished, in the plan's order, each through the one stage runner of every launch script
(:func:`uedist.app.jobs.run_stage`), and leave its ``stage.json`` record.

A stage that stops on bad input (a corrupt shard, a bad config value, a checkpoint of other data) or a non-finite
loss ends the study with the single job's exit code (2 or 3) and a logged message naming the stage (``stage attack
cifar10.lsp: <the shard file>: ...``): :class:`uedist.app.jobs.StageFailed`, which :func:`uedist.app.jobs.guarded`
turns into that code (``launch/pipeline.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import yaml

from uedist.app.jobs import StageFailed, from_main, run_stage
from uedist.config import ConfigError, config_to_dict, identity, load_config, save_config
from uedist.dist import get_logger
from uedist.io import atomic_write_json, atomic_write_text

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
    standalone = StandaloneRuns(study)
    for i, st in enumerate(study.stages):
        where = f"[{i + 1}/{len(study.stages)}] {st.kind} {st.label}"
        if states[st.label] == "unneeded":
            log.info("%s: not needed, every stage that reads it is done", where)
            continue
        if states[st.label] == "done":
            log.info("%s: done earlier, reusing %s", where, st.dir)
            rec = study.record(st)
        else:
            found = from_main(standalone.find(st) if accelerator.is_main_process else None, accelerator)
            if found is not None:
                log.info("%s: the finished run %s has its identity: reusing it in %s", where, found[0], st.dir)
                rec = standalone.adopt(st, *found, accelerator=accelerator)
            else:
                log.info("%s: running in %s", where, st.dir)
                rec = run_study_stage(study, st, accelerator)
        records.append(rec)
    return records


class StandaloneRuns:
    """Finished standalone runs a study reuses: a folder ``<root>/<name>/`` with ``config.yaml`` and
    ``metrics.json`` (a launch script's run, finished) under the study's ``run_root`` or a folder of its ``reuse``
    list. A stage to run reuses one when

    - its config has the stage's identity (:func:`uedist.config.identity`; ``data.build``, how a missing input set
      would be made, left out: a study builds its datasets itself), with the outputs of stages reused before it
      standing for the run's own (the main job's ``runs/sem_demo/poisoned``, then the victim trained on it);
    - every input it names (a shard set, a run folder) was last written before the run finished (its hash covers
      the inputs' content, which a standalone run does not record: a set rebuilt since is not trusted);
    - it names no YAML file by path (whose content the stage hash covers and the run does not record), and the
      stage's folder does not exist yet (a stage begun in the study resumes its own work).

    Reusing links the run's files into the stage folder (hard links, a copy across file systems; not its logs)
    and writes the stage's ``stage.json`` from its ``metrics.json``, with ``reused_from`` naming the run."""

    def __init__(self, study: "Study") -> None:
        roots = [Path(study.cfg.run_root), *(Path(r) for r in study.cfg.reuse)]
        found = {d for r in roots if r.is_dir() for d in r.iterdir() if _finished_run(d)}
        self.study, self.dirs = study, sorted(found)
        self.raw: Dict[Path, Any] = {}
        self.moved: Dict[str, str] = {}  # a reused stage's output in the study -> the run's output

    def find(self, st: "Stage") -> Optional[Tuple[Path, Path]]:
        """(run folder, its output) of a finished run with the stage's identity, or None."""
        from uedist.app.pipeline import _config_files

        if st.dir is None or st.dir.exists() or _config_files(identity(st.cfg)):
            return None
        want = _comparable(_swap(identity(st.cfg), self.moved))
        method = getattr(st.cfg, "method", None)
        for d in self.dirs:
            if method is not None and self._raw(d).get("method") != method:
                continue
            try:
                cfg = load_config(st.runner.schema, d / "config.yaml")
            except (ConfigError, OSError, TypeError, ValueError):  # a run of another stage, or a broken one
                continue
            out = Path(cfg.out) if getattr(cfg, "out", "") else d / st.runner.output
            out = d if st.runner.output in ("", "run") else out
            if _comparable(identity(cfg)) == want and _output_ready(out, st) and _inputs_older(identity(cfg), d):
                return d, out
        return None

    def _raw(self, d: Path) -> Dict[str, Any]:
        if d not in self.raw:
            try:
                raw = yaml.safe_load((d / "config.yaml").read_text())
            except (OSError, yaml.YAMLError):
                raw = None
            self.raw[d] = raw if isinstance(raw, dict) else {}
        return self.raw[d]

    def adopt(self, st: "Stage", run: Path, out: Path, *, accelerator: Any) -> Dict[str, Any]:
        """Link the run's files into the stage folder and write its record (main process); the record."""
        assert st.dir is not None
        t0, mine = time.time(), self.study.output_path(st)
        text = (run / "metrics.json").read_text()
        swaps = [(str(out), mine), (str(run), str(st.dir)), *((b, a) for a, b in self.moved.items())]
        for old, new in swaps:  # the run's paths (and those of runs reused before it) as the study's
            pat = re.compile(re.escape(json.dumps(old)[:-1]) + r'(?=[/"])')
            text = pat.sub(lambda _m: json.dumps(new)[:-1], text)
        rec = stage_record(
            self.study, st, json.loads(text), wall_s=time.time() - t0, world_size=accelerator.num_processes
        )
        rec["reused_from"] = str(run)
        if accelerator.is_main_process:
            _link_tree(run, st.dir)
            if st.runner.output not in ("", "run") and not Path(mine).exists():
                _link_tree(out, Path(mine))  # the run wrote its set outside its folder (out=...)
            atomic_write_text(st.dir / "metrics.json", text)
            save_config(st.cfg, st.dir / "config.yaml")
            atomic_write_json(st.dir / "stage.json", rec)
        accelerator.wait_for_everyone()
        self.moved[mine] = str(out)
        return rec


def _finished_run(d: Path) -> bool:
    return d.is_dir() and (d / "config.yaml").is_file() and (d / "metrics.json").is_file()


def _swap(obj: Any, paths: Dict[str, str]) -> Any:
    """``obj`` with every string equal to a key of ``paths`` replaced by its value (recursively)."""
    if isinstance(obj, dict):
        return {k: _swap(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_swap(v, paths) for v in obj]
    return paths.get(obj, obj) if isinstance(obj, str) else obj


def _comparable(ident: Dict[str, Any]) -> Dict[str, Any]:
    """An identity without ``data.build`` (how a missing input set would be built, not what is computed)."""
    data = ident.get("data")
    return {**ident, "data": {k: v for k, v in data.items() if k != "build"}} if isinstance(data, dict) else ident


def _output_ready(out: Path, st: "Stage") -> bool:
    return out.is_dir() if st.runner.output in ("", "run") else (out / "manifest.json").is_file()


def _inputs_older(ident: Any, run: Path) -> bool:
    """Whether every shard set and run folder ``ident`` names was last written before ``run`` finished."""
    from uedist.app.pipeline import leaf_strings

    done = (run / "metrics.json").stat().st_mtime
    return all((_written(x) or 0.0) <= done for x in leaf_strings(ident) if x)


def _written(path: str) -> Optional[float]:
    """When the shard set (its manifest) or finished run (its metrics) at ``path`` was written; None if none is."""
    for mark in ("manifest.json", "metrics.json"):
        try:
            return Path(path, mark).stat().st_mtime
        except (OSError, ValueError):  # not there, or not a path at all
            continue
    return None


def _link_tree(src: Path, dst: Path) -> None:
    """``src`` recreated at ``dst`` with hard links (a copy where linking fails), without its lock, its logs and
    the records the study writes itself."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    def skip(folder: str, names: List[str]) -> List[str]:
        top = Path(folder) == src
        return [
            n for n in names if n == ".lock" or (top and n in ("logs", "stage.json", "config.yaml", "metrics.json"))
        ]

    shutil.copytree(src, dst, ignore=skip, copy_function=link, dirs_exist_ok=True)


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
