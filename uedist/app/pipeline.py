"""One config, one command, a whole study: datasets × attacks × purifiers × victims × training modes.

    accelerate launch launch/pipeline.py --config configs/pipeline/cpu_synthetic.yaml [key=value ...]

A study expands into *stages* (docs/architecture.md): build the shard sets, make each poisoned set (attack), purify
each (purifier; D-VAE, JCDP, plain diffusion, the ISS baselines, or none), train a DDPM when a diffusion
purifier needs one, and train each victim on each purified set in each mode. Every stage is the ordinary uedist
stage function (the same code as its own launch script), run in dependency order on all ranks.

Reuse and resume: a stage's folder is ``<run_root>/<study>/<kind>/<label>-<hash>``, the hash taken over the
stage's resolved config *including its inputs' hashes*; a finished stage leaves ``stage.json`` (config, summary,
outputs, wall time), and a later run with the same resolved config reuses it. A stage that was interrupted has no
``stage.json`` and is simply run again, which resumes from its own checkpoints and finished shards. Change a
setting and exactly the stages downstream of it get new hashes and run; nothing else does.

This module *plans* a study: the config schema, the expansion into stages, their hashes, folders and states (done /
to run / not needed, from the ``stage.json`` records). :mod:`uedist.app.study_run` *runs* the plan, each stage
through the one stage runner of every launch script (:func:`uedist.app.jobs.run_stage`: bad input exits 2 and a
non-finite loss 3, the message naming the stage and the culprit). At the end the report (``uedist report``) is
written: see :mod:`uedist.app.report`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Literal, Optional, Union

from uedist.app.paper_tables import validate_columns
from uedist.config import ConfigError, identity, load_config, log_with_problem, require, run_dir
from uedist.registry import StageDef, stages_of

# Study-only pseudo-methods: the clean row (no attack) and the unpurified column (no purifier).
NO_ATTACK, NO_PURIFIER = "clean", "none"


@dataclass
class DatasetSpec:
    train: str = ""  # clean train shard set
    test: str = ""  # clean test shard set (victims are evaluated on it)
    build: str = ""  # shard build config (configs/shards/*.yaml) run when train is missing


@dataclass
class StageSpec:
    """A stage template: the method, a YAML of its own schema (``{dataset}`` is replaced by the dataset's key) and
    overrides as a mapping of dotted keys (``{"em.mode": "classwise"}``)."""

    method: str = ""
    config: str = ""
    set: Dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyConfig:
    renamed: ClassVar[Dict[str, str]] = {"noises": "attacks"}  # an old study config is refused with the new key

    name: str = "study"
    run_root: str = "runs"
    datasets: Dict[str, DatasetSpec] = field(default_factory=dict)
    attacks: Dict[str, StageSpec] = field(default_factory=dict)  # the table's rows; method clean = no attack
    purifiers: Dict[str, StageSpec] = field(default_factory=dict)  # the table's columns; empty = {none: {method: none}}
    victims: Dict[str, StageSpec] = field(default_factory=dict)  # config: a configs/victim/*.yaml
    modes: List[Literal["standard", "adversarial"]] = field(default_factory=lambda: ["standard"])
    adversarial: Dict[str, Any] = field(default_factory=lambda: {"adv.enabled": True})  # victim overrides in that mode
    ddpm: Dict[str, StageSpec] = field(default_factory=dict)  # per dataset key: the DDPM diffusion purifiers use
    skip: List[str] = field(default_factory=list)  # "dataset/attack/purifier/victim/mode" fnmatch patterns
    report: bool = True
    # report columns: name -> "purifier/victim[/mode]" (a list: the best of them); paper_table: the published
    # table (uedist.app.paper_tables) whose figures the report writes beside ours, matched by row and column name
    columns: Dict[str, Union[str, List[str]]] = field(default_factory=dict)
    paper_table: str = ""
    # finished standalone runs (<folder>/<name>/ of a launch script) that a stage of the same identity reuses
    # instead of computing (uedist.app.study_run.StandaloneRuns): run_root is always searched, these folders too
    reuse: List[str] = field(default_factory=list)

    def validate(self) -> None:
        from uedist.app.stages import load_stages

        load_stages()
        attacks, purifiers = [NO_ATTACK, *stages_of("attack")], [NO_PURIFIER, *stages_of("purify")]
        require(bool(self.datasets), "datasets: at least one")
        require(bool(self.attacks), "attacks: at least one (method clean for the clean row)")
        require(bool(self.victims), "victims: at least one")
        require(bool(self.modes) and len(set(self.modes)) == len(self.modes), "modes: a non-empty list without repeats")
        for d, s in self.datasets.items():
            require(bool(s.train and s.test), f"datasets.{d}: train and test are required")
        for k, s in self.attacks.items():
            require(s.method in attacks, f"attacks.{k}.method: one of {attacks}, got {s.method!r}")
        for k, s in self.purifiers.items():
            require(s.method in purifiers, f"purifiers.{k}.method: one of {purifiers}, got {s.method!r}")
            if needs_ddpm(s.method):
                for d in self.datasets:
                    require(d in self.ddpm, f"purifiers.{k} ({s.method}) needs ddpm.{d}: the DDPM to purify with")
        for k, s in self.victims.items():
            require(bool(s.config), f"victims.{k}.config (a configs/victim/*.yaml) is required")
        for r in self.reuse:
            require(Path(r).is_dir(), f"reuse: {r} is not a folder (one holding finished runs, e.g. runs)")
        for k in (*self.attacks, *self.purifiers, *self.victims, *self.datasets):
            require("/" not in k and k.strip() == k and k != "", f"bad name {k!r}: no slashes or spaces")
        validate_columns(self)  # the report columns and the paper table


# -------------------------------------------------------------------------------------------------- stage lookup
def _stage(name: str) -> StageDef:
    from uedist.app.stages import get_stage

    return get_stage(name)


def needs_ddpm(method: str) -> bool:
    """Whether a purifier reads a trained DDPM (its stage has a ``ddpm`` input)."""
    return method != NO_PURIFIER and "ddpm" in _stage(method).roles


# --------------------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    kind: str  # attack | purify | victim | ddpm
    label: str  # e.g. "synthetic.sem" (dataset.attack[.purifier[.victim.mode]])
    spec: StageSpec
    runner: StageDef
    inputs: Dict[str, Any]  # role -> path (or a Stage whose output it is)
    tags: Dict[str, str]  # dataset / attack / purifier / victim / mode, for the report
    origin: str = ""  # where in the study config the stage comes from (for errors)
    cfg: Any = None
    hash: str = ""
    dir: Optional[Path] = None

    def __repr__(self) -> str:
        return f"<{self.kind} {self.label} {self.hash}>"


# The attack kind was called "noise" before; its hashes keep that name, and a stage reading an attack's set hashes
# that set's path as it was (<study>/noise/<stage>/poisoned: Study._resolve), so results finished before the rename
# (and their downstream stages) stay valid. `uedist report --migrate` (uedist.app.study_records) moves such a
# study's folders; launch/pipeline.py migrates the folder it runs in.
_HASH_KIND = {"attack": "noise"}


def _stage_hash(kind: str, cfg: Any, inputs: Dict[str, Any]) -> str:
    d = identity(cfg)
    ins = {r: (v.hash if isinstance(v, Stage) else _data_id(v)) for r, v in sorted(inputs.items())}
    h: Dict[str, Any] = {"kind": _HASH_KIND.get(kind, kind), "config": d, "inputs": ins}
    files = _config_files(d)
    if files:  # (only then: the hashes of stages that name no config file stay as they were)
        h["files"] = files
    blob = json.dumps(h, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def leaf_strings(tree: Any) -> Iterator[str]:
    """Every string in a nested config tree of dicts and lists (a stage's identity: its paths, names, values)."""
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack += list(x.values())
        elif isinstance(x, list):
            stack += x
        elif isinstance(x, str):
            yield x


def _config_files(d: Any) -> Dict[str, Any]:
    """The resolved content (``base:`` chain merged) of every YAML file a stage's config names by path (TAP / SEP's
    ``source_victim``: the victim trained as its source), so an edit of that file gives the stage a new hash instead
    of "already done" with results of the old one."""
    from uedist.config import _read_yaml

    return {x: _read_yaml(x) for x in leaf_strings(d) if x.endswith((".yaml", ".yml")) and Path(x).is_file()}


def _data_id(path: Any) -> str:
    """A dataset input's identity for stage hashes: its path *and content* (its shards' digest), so a set rebuilt in
    place (other settings, a newer synthetic generator) gives its stages new folders instead of reusing results
    made from the old data. An unbuilt set is named by its path alone (run() re-expands once the sets are built)."""
    from uedist.data.manifest import content_digest

    digest = content_digest(str(path))
    return f"{path}@{digest}" if digest else str(path)


class Study:
    """The plan of a StudyConfig: its expanded stage graph (``stages``, in dependency order) and each stage's state;
    :meth:`run` runs it on all ranks (:mod:`uedist.app.study_run`)."""

    def __init__(self, cfg: StudyConfig, root: Optional[Path] = None) -> None:
        self.cfg = cfg
        self.dir = Path(root) if root else run_dir(cfg.run_root, cfg.name)
        self.stages: List[Stage] = []
        self.plan()
        for st in self.stages:  # a stage that would fail at its first curve row stops the study before it starts
            problem = log_with_problem(st.cfg)
            if problem:
                raise ConfigError(f"{st.origin} (stage {st.kind} {st.label}): {problem}")

    def plan(self) -> None:
        """(Re-)expand the stages, hashing each over its resolved config and its inputs' current content."""
        self.stages = []
        self._expand()

    # ------------------------------------------------------------------------------------------------- expansion
    def _skipped(self, *parts: str) -> bool:
        path = "/".join(parts)
        return any(fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(path + "/*", pat) for pat in self.cfg.skip)

    def _expand(self) -> None:
        """datasets × attacks × purifiers × victims × modes -> stages, in dependency order."""
        c = self.cfg
        if not c.purifiers:
            c.purifiers = {NO_PURIFIER: StageSpec(method=NO_PURIFIER)}
        for dname, ds in c.datasets.items():
            ddpm: Dict[str, Stage] = {}  # added with the first diffusion purifier that is not skipped
            for nname, nspec in c.attacks.items():
                if self._skipped(dname, nname):
                    continue
                poisoned: Any = Path(ds.train)
                if nspec.method != NO_ATTACK:
                    poisoned = self._add(
                        "attack",
                        f"{dname}.{nname}",
                        nspec,
                        inputs={"train": ds.train, "test": ds.test},
                        tags={"dataset": dname, "attack": nname},
                        dataset=dname,
                        origin=f"attacks.{nname}",
                    )
                for pname, pspec in c.purifiers.items():
                    if self._skipped(dname, nname, pname):
                        continue
                    if needs_ddpm(pspec.method) and not ddpm:
                        ddpm["stage"] = self._add_ddpm(dname)
                    self._expand_purifier(dname, nname, pname, poisoned=poisoned, ddpm=ddpm.get("stage"))

    def _add_ddpm(self, dname: str) -> Stage:
        """The dataset's DDPM stage; by default (the paper's setting) trained on the unprotected clean test split.
        Only a study that runs a diffusion purifier has one: a DDPM whose every purifier cell is skipped is not
        trained."""
        own = "data.train" in _flatten(self.cfg.ddpm[dname].set)
        return self._add(
            "ddpm",
            f"{dname}.ddpm",
            self.cfg.ddpm[dname],
            inputs={} if own else {"train": self.cfg.datasets[dname].test},
            tags={"dataset": dname},
            dataset=dname,
            origin=f"ddpm.{dname}",
        )

    def _expand_purifier(self, dname: str, nname: str, pname: str, *, poisoned: Any, ddpm: Optional[Stage]) -> None:
        """One purifier column of one attack row (or the set itself for ``none``), then its victims."""
        c, ds, pspec = self.cfg, self.cfg.datasets[dname], self.cfg.purifiers[pname]
        tags = {"dataset": dname, "attack": nname, "purifier": pname}
        purified: Any = poisoned
        if pspec.method != NO_PURIFIER:
            ins: Dict[str, Any] = {"src": poisoned, "clean": ds.train}
            if needs_ddpm(pspec.method):
                ins["ddpm"] = ddpm
            purified = self._add(
                "purify",
                f"{dname}.{nname}.{pname}",
                pspec,
                inputs=ins,
                tags=tags,
                dataset=dname,
                origin=f"purifiers.{pname}",
            )
        for vname, vspec in c.victims.items():
            for mode in c.modes:
                if self._skipped(dname, nname, pname, vname, mode):
                    continue
                spec = vspec
                if mode == "adversarial":
                    spec = StageSpec(vspec.method, vspec.config, {**vspec.set, **c.adversarial})
                self._add(
                    "victim",
                    f"{dname}.{nname}.{pname}.{vname}.{mode}",
                    spec,
                    inputs={"train": purified, "test": ds.test},
                    tags={**tags, "victim": vname, "mode": mode},
                    dataset=dname,
                    origin=f"victims.{vname}",
                )

    def _add(
        self,
        kind: str,
        label: str,
        spec: StageSpec,
        *,
        inputs: Dict[str, Any],
        tags: Dict[str, str],
        dataset: str,
        origin: str,
    ) -> Stage:
        """Resolve one stage (the registry's stage named by ``spec.method``, or the kind's one stage) and append it."""
        runner = _stage(spec.method if kind in ("attack", "purify") else kind)
        st = Stage(kind, label, spec, runner, inputs, tags, origin)
        st.cfg = self._resolve(st, dataset)
        st.hash = _stage_hash(kind, st.cfg, inputs)
        st.dir = self.dir / kind / f"{label}-{st.hash}"
        # name / run_root / out point into the stage folder (not part of the hash)
        st.cfg = self._resolve(st, dataset, final=True)
        self.stages.append(st)
        return st

    def _resolve(self, st: Stage, dataset: str, final: bool = False) -> Any:
        schema = st.runner.schema
        path = st.spec.config.replace("{dataset}", dataset) if st.spec.config else None
        over = {**st.spec.set, **dict(st.runner.fixed)}
        if st.kind == "attack" and "build" in _fields(schema, "data"):
            over["data.build"] = ""  # a study builds its datasets itself (run() below)
        for role, key in st.runner.roles.items():
            v = st.inputs.get(role)
            if v is not None:  # an input stage's output: as the hash sees it (before final), then where it is
                over[key] = (self.output_path(v) if final else self._hashed_path(v)) if isinstance(v, Stage) else str(v)
        over["progress"] = False
        if final:
            assert st.dir is not None
            over["name"], over["run_root"] = st.dir.name, str(st.dir.parent)
            if st.runner.output not in ("", "run"):
                over["out"] = self.output_path(st)  # whatever the YAML says, the output lives in the stage folder
        try:
            return load_config(schema, path, [f"{k}={json.dumps(v)}" for k, v in _flatten(over).items()])
        except ConfigError as e:
            raise ConfigError(f"{st.origin} (stage {st.kind} {st.label}): {e}") from e

    def _hashed_path(self, st: Stage) -> str:
        """An input stage's output path as the hashes of the stages reading it see it: in the folder of the kind's
        hash name (``noise/`` for an attack, :data:`_HASH_KIND`)."""
        assert st.dir is not None
        kind = _HASH_KIND.get(st.kind, st.kind)
        return self.output_path(st).replace(
            str(self.dir / st.kind / st.dir.name), str(self.dir / kind / st.dir.name), 1
        )

    @staticmethod
    def output_path(st: Stage) -> str:
        """Where the stage's output lives: its shard set in the stage folder, or the folder itself (a run)."""
        assert st.dir is not None
        return str(st.dir / st.runner.output) if st.runner.output != "run" else str(st.dir)

    # ----------------------------------------------------------------------------------------------- state (plan)
    def record(self, st: Stage) -> Optional[Dict[str, Any]]:
        assert st.dir is not None
        f = st.dir / "stage.json"
        if not f.is_file():
            return None
        rec = json.loads(f.read_text())
        return rec if rec.get("hash") == st.hash else None

    def _output_present(self, st: Stage) -> bool:
        """Whether the stage's output is still on disk (a shard set's manifest, or the run folder)."""
        out = Path(self.output_path(st))
        return (out / "manifest.json").is_file() if st.runner.output not in ("", "run") else out.is_dir()

    def states(self) -> Dict[str, str]:
        """label -> ``done`` | ``todo`` | ``unneeded``, decided from the last stage back:

        - a stage with its ``stage.json`` is ``done``, unless a stage that reads it will run and its output is gone
          (deleted to save disk, or only the records were copied here from another machine): then ``todo``;
        - a stage without one is ``todo``, unless other stages read it and every one of them is done: then
          ``unneeded`` (an intermediate set is not rebuilt for results that already exist)."""
        readers: Dict[int, List[Stage]] = {id(st): [] for st in self.stages}
        for st in self.stages:
            for v in st.inputs.values():
                if isinstance(v, Stage):
                    readers[id(v)].append(st)
        state: Dict[int, str] = {}
        for st in reversed(self.stages):
            needed = any(state[id(r)] == "todo" for r in readers[id(st)])
            if self.record(st) is not None:
                state[id(st)] = "todo" if needed and not self._output_present(st) else "done"
            else:
                state[id(st)] = "todo" if needed or not readers[id(st)] else "unneeded"
        return {st.label: state[id(st)] for st in self.stages}

    def run(self, accelerator: Any) -> List[Dict[str, Any]]:
        """Build the datasets and run every stage not yet finished (:func:`uedist.app.study_run.run_study`)."""
        from uedist.app.study_run import run_study

        return run_study(self, accelerator)


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}, so a nested override changes one key, not the whole section."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fields(schema: type, section: str) -> List[str]:
    """The field names of one nested section of a schema (``[]`` when there is none)."""
    import dataclasses

    f = {x.name: x for x in dataclasses.fields(schema)}.get(section)
    sub = f.default_factory() if f is not None and f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
    return [x.name for x in dataclasses.fields(sub)] if dataclasses.is_dataclass(sub) else []


def load_study(path: Optional[str], overrides: List[str]) -> StudyConfig:
    return load_config(StudyConfig, path, overrides)
