"""The common start of every launch script, and the one runner of any registered stage.

    sys.exit(run_stage_main("attack", argv, doc=__doc__))                          # launch/attack.py: any attack
    sys.exit(run_stage_main("attack", argv, doc=__doc__, method="sem",
                            default_config="configs/sem/demo.yaml"))              # launch/sem.py: the main job

``run_stage_main`` parses ``--config FILE key=value ...``, picks the stage (``method`` of the config, or the one
the script fixes) from the registry (:mod:`uedist.app.stages`), loads the config strictly against that stage's
schema, makes the Accelerator, sets up per-rank logging in the run folder, saves the resolved config there, runs
the stage and prints its summary. Exit codes shared by all scripts: 2 = bad config or input (argparse's
convention), 3 = a non-finite loss stopped training (the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

from uedist.config import ConfigError, _read_yaml, load_config, log_with_problem, parse_override, save_config
from uedist.config import run_dir as run_dir_of
from uedist.dist import get_logger, make_accelerator, setup_logging
from uedist.io import DiskFull
from uedist.registry import RegistryError, StageDef, stages_of

C = TypeVar("C")
REPO = Path(__file__).resolve().parents[2]
log = get_logger("uedist.app.jobs")


def start_job(
    schema: Type[C],
    argv: Optional[List[str]] = None,
    *,
    doc: Optional[str] = None,
    config_dir: str = "configs/",
    example: str = "key=value",
    default_config: Optional[str] = None,
    fixed: Sequence[str] = (),
    check: Optional[Callable[[C], Optional[str]]] = None,
) -> Tuple[C, Any, Path]:
    """Parse the command line into a ``schema`` config (``fixed`` overrides come last: a script's fixed method
    wins), then start the job. ``check(cfg)`` may return an error message that stops the script like a config
    error."""
    p, args = _parse(argv, doc=doc, config_dir=config_dir, example=example, default_config=default_config)
    try:
        cfg = load_config(schema, args.config or default_config, [*args.overrides, *fixed])
    except ConfigError as e:
        p.error(str(e))
    return _start(cfg, p, check)


def _parse(
    argv: Optional[List[str]], *, doc: Optional[str], config_dir: str, example: str, default_config: Optional[str]
) -> Tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML ({config_dir})" + (f"; default {default_config}" if default_config else ""))
    p.add_argument("overrides", nargs="*", help=f"key=value, e.g. {example}")
    return p, p.parse_args(argv)


def _start(cfg: C, p: argparse.ArgumentParser, check: Optional[Callable[[C], Optional[str]]]) -> Tuple[C, Any, Path]:
    problem = (check(cfg) if check else None) or log_with_problem(cfg)  # before the run folder exists
    if problem:
        p.error(problem)
    try:
        run_dir = run_dir_of(cfg.run_root, cfg.name)  # type: ignore[attr-defined]
    except ConfigError as e:
        p.error(str(e))
    try:
        accelerator = make_accelerator()
    except ConfigError as e:  # e.g. a bad UEDIST_COLLECTIVE_TIMEOUT
        p.error(str(e))
    problem = claim_run(cfg, run_dir) if accelerator.is_main_process else None
    problem = from_main(problem, accelerator)  # every rank stops alike, none waits on a collective
    if problem:
        p.error(problem)
    setup_logging(run_dir)
    if accelerator.is_main_process:
        try:
            save_config(cfg, run_dir / "config.yaml")
        except DiskFull as e:  # a full disk at job start: exit 2 naming the file, not a traceback
            p.error(str(e))
    return cfg, accelerator, run_dir


def claim_run(cfg: Any, run_dir: Path) -> Optional[str]:
    """Main process, before anything is written: lock the run folder for this job (a second job under the same
    name is refused, not interleaved), and refuse a config whose identity differs from the one the folder already
    holds (its checkpoints and outputs belong to that one: nothing is overwritten, ``config.yaml`` included).
    Returns the refusal, or None."""
    from uedist.config import identity
    from uedist.io import RunInUse, hold_lock

    try:
        hold_lock(run_dir, what="run")
    except RunInUse as e:
        return str(e)
    saved = run_dir / "config.yaml"
    if not saved.is_file() or getattr(cfg, "overwrite", False):  # overwrite=true: the user asks to replace it
        return None
    try:
        old: Any = identity(load_config(type(cfg), saved))
    except ConfigError as e:
        old, why = None, f"it no longer loads: {e}"
    new = identity(cfg)
    if old == new:
        return None
    if old is not None:
        why = "differs in " + ", ".join(_differing(old, new))
    return (
        f"{run_dir} holds a run of another config ({why}); its checkpoints and outputs belong to that config, so "
        f"nothing was changed. Use another name=..., or delete {run_dir} to start over under this name"
    )


def _differing(a: Any, b: Any, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two identity dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: List[str] = []
        for k in sorted(set(a) | set(b)):
            out += _differing(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def from_main(value: Any, accelerator: Any) -> Any:
    """The main process's ``value`` on every rank."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def input_error_types() -> Tuple[Type[BaseException], ...]:
    """What every job treats as bad input (exit code 2, the message logged, no traceback): each names the key,
    file, shard or sample at fault."""
    from uedist.checkpoint import CheckpointError
    from uedist.config import ConfigError
    from uedist.data.images import CorruptImageError
    from uedist.data.manifest import ManifestError
    from uedist.data.shards import ShardError
    from uedist.data.sources.base import SourceError
    from uedist.dist import CollectiveTimeout
    from uedist.io import DiskFull, RunInUse

    return (
        ConfigError,
        ManifestError,
        ShardError,
        SourceError,
        CorruptImageError,
        CheckpointError,
        DiskFull,
        RunInUse,
        CollectiveTimeout,
    )


class StageFailed(Exception):
    """A stage of a study stopped with exit code ``code`` (2: bad input, 3: a non-finite loss); its message,
    naming the stage and the culprit, is already logged. :func:`guarded` returns the code."""

    def __init__(self, code: int, where: str) -> None:
        super().__init__(f"{where}: exit code {code}")
        self.code, self.where = code, where


def guarded(
    fn: Callable[[], Any],
    log: logging.Logger,
    input_errors: Tuple[Type[BaseException], ...] = (),
    *,
    where: str = "",
) -> Any:
    """Run the job; a non-finite loss -> exit code 3; a checkpoint of another config or data, bad input
    (:func:`input_error_types`: a bad shard, manifest, source image, checkpoint or config value, a full disk, a
    peer that stopped answering) or one of the stage's own ``input_errors`` -> exit code 2 (logged, not a
    traceback; prefixed with ``where``, e.g. ``stage attack cifar10.lsp``, when given); a :class:`StageFailed` (a
    study's stage that already logged why) -> its code. Returns the job's result, or the exit code as an ``int``.
    Anything else is a bug: a traceback."""
    from uedist.engine.train.checkpoints import CheckpointMismatch, NonFiniteLoss

    input_errors = (*input_error_types(), *input_errors)

    def fail(code: int, e: BaseException) -> int:
        log.error("%s%s", f"{where}: " if where else "", e)
        return code

    try:
        return fn()
    except StageFailed as e:
        return e.code
    except NonFiniteLoss as e:
        return fail(3, e)
    except CheckpointMismatch as e:  # another config or rebuilt data under the same run name: nothing resumed
        return fail(2, e)
    except input_errors as e:  # type: ignore[misc]
        return fail(2, e)
    except RuntimeError as e:
        from uedist.dist import as_collective_timeout

        timeout = as_collective_timeout(e)
        if timeout is None:
            raise
        return fail(2, timeout)


def stage_method(config: Optional[str], overrides: Sequence[str]) -> str:
    """The ``method`` a command line asks for: the last ``method=`` override, else the config file's (bases
    included), else ""."""
    for text in reversed(overrides):
        keys, value = parse_override(text)
        if keys == ["method"]:
            return str(value)
    return str(_read_yaml(config).get("method", "")) if config else ""


def run_stage_main(
    kind: str,
    argv: Optional[List[str]] = None,
    *,
    doc: Optional[str] = None,
    method: Optional[str] = None,
    default_method: str = "",
    default_config: Optional[str] = None,
) -> int:
    """Run one registered stage of ``kind`` from a command line; returns the exit code. A ``method=`` override
    picks the stage; else ``method`` (``launch/sem.py``); else the config's ``method`` (``launch/attack.py``,
    ``launch/purify.py``),
    else ``default_method`` (the one stage of a kind such as ``victim``)."""
    from uedist.app.stages import get_stage, load_stages

    load_stages()
    default = str(REPO / default_config) if default_config and not Path(default_config).is_file() else default_config
    p, args = _parse(
        argv, doc=doc, config_dir=f"configs/{method or '<method>'}/", example="name=my_run", default_config=default
    )
    path = args.config or default
    try:
        # an explicit method=... on the command line wins, then the script's own, then the config's
        name = stage_method(None, args.overrides) or method or stage_method(path, []) or default_method
        if not name:
            p.error(
                f"say which {kind} method: `method: <name>` in the YAML or method=<name>; "
                f"{kind} methods: {', '.join(stages_of(kind))}"
            )
        st = get_stage(name, kind)
        fixed = [f"{k}={v}" for k, v in st.fixed]
        cfg = load_config(st.schema, path, [*args.overrides, *fixed])
    except (ConfigError, RegistryError) as e:
        p.error(str(e))
    cfg, accelerator, run_dir = _start(cfg, p, st.check)
    return _run(st, cfg, accelerator=accelerator, run_dir=run_dir)


def _run(st: StageDef, cfg: Any, *, accelerator: Any, run_dir: Path) -> int:
    t0 = time.time()
    s = run_stage(st, cfg, accelerator=accelerator, run_dir=run_dir)
    if isinstance(s, int):
        return s
    if accelerator.is_main_process and st.summary is not None:
        sys.stdout.write(st.summary({**s, "wall_s": time.time() - t0}, run_dir) + "\n")  # the job's product, bare
        sys.stdout.flush()
    return 0


def run_stage(
    st: StageDef, cfg: Any, *, accelerator: Any, run_dir: Path, where: str = ""
) -> Union[Dict[str, Any], int]:
    """The one runner of a registered stage, for a launch script (:func:`run_stage_main`) and for every stage of
    a study (:mod:`uedist.app.study_run`): the stage's ``check``, its inputs prepared (:func:`prepare_inputs`),
    then the stage itself, all under :func:`guarded`. Returns the stage's summary, or an exit code (2: bad config
    or input, 3: a non-finite loss) once the reason is logged, prefixed with ``where`` (a study names the stage,
    ``stage attack cifar10.lsp``)."""
    logger = get_logger(f"uedist.{st.kind}.{st.name}")

    def body() -> Any:
        problem = st.check(cfg) if st.check else None
        if problem:
            raise ConfigError(problem)
        if accelerator.is_main_process:  # (this module's logger: the stage's own carries only the stage's lines)
            log.info("%s", precision_line(cfg, accelerator.device))
        return prepare_inputs(cfg, accelerator) or st(cfg, accelerator, run_dir)

    return guarded(body, logger, st.input_errors, where=where)


def precision_line(cfg: Any, device: Any) -> str:
    """The one line every job logs at its start: the precision it resolved and why (``bf16``: set in the config,
    or ``null`` = auto: on only where ``device`` runs bf16 natively, :mod:`uedist.precision`), and on a CPU the
    threads it computes with (``accelerate launch`` gives one process ``OMP_NUM_THREADS=1`` unless told more)."""
    import os

    import torch

    from uedist.precision import bf16_native, use_bf16, use_channels_last

    if not hasattr(cfg, "bf16"):
        line = "precision: fp32 (this stage has no bf16 setting)"
    else:
        native, on = bf16_native(device), use_bf16(cfg.bf16, device)
        if device.type == "cuda":
            hw = "this GPU runs bf16 natively" if native else "this GPU has no native bf16 (compute capability < 8.0)"
        elif native:
            amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
            hw = f"this CPU runs bf16 natively ({'AMX' if amx else 'AVX-512 BF16'})"
        else:
            cap = torch.backends.cpu.get_cpu_capability()
            hw = f"this CPU has no native bf16 ({cap}, no AMX or AVX-512 BF16): emulated bf16 is slower than fp32"
        how = "auto" if cfg.bf16 is None else f"{str(cfg.bf16).lower()} in the config"
        cl = hasattr(cfg, "channels_last") and use_channels_last(cfg.channels_last, device)
        line = f"precision: {'bf16 autocast' if on else 'fp32'}{' + channels_last' if cl else ''} (bf16: {how}; {hw})"
        if getattr(cfg, "deepspeed", ""):
            line += "; under DeepSpeed its JSON's bf16 decides the model's dtype"
    if device.type == "cpu":
        omp = os.environ.get("OMP_NUM_THREADS")
        line += f"; {torch.get_num_threads()} of {os.cpu_count()} CPU threads"
        line += f" (OMP_NUM_THREADS={omp})" if omp else ""
    return line


def prepare_inputs(cfg: Any, accelerator: Any) -> int:
    """A config with ``data.build`` (the main job's synthetic set): build ``data.train`` from it when it is
    missing; when it exists, check it is what ``data.build`` builds now (a set left by an older synthetic
    generator is refused, not silently used). Returns an exit code (0 = go on)."""
    build = getattr(getattr(cfg, "data", None), "build", "")
    if not build:
        return 0
    from uedist.data.build import BuildConfig, build_shard_sets, stale_message

    build_cfg = load_config(BuildConfig, build if Path(build).is_file() else REPO / build)
    if Path(cfg.data.train, "manifest.json").is_file():
        msg = stale_message(build_cfg, build)  # every rank decides alike, so all exit together
        if msg and accelerator.is_main_process:
            log.error("%s", msg)
        return 2 if msg else 0
    if accelerator.is_main_process:
        log.info("%s is missing: building it from %s", cfg.data.train, build)
        build_shard_sets(build_cfg)
    accelerator.wait_for_everyone()
    if not Path(cfg.data.train, "manifest.json").is_file():
        raise FileNotFoundError(f"{build} did not produce {cfg.data.train} (check its `out`)")
    return 0
