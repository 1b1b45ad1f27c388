"""The common start of every launch script: parse ``--config FILE key=value ...`` against a config schema, make the
Accelerator, set up per-rank logging in the run folder and save the resolved config there.

    cfg, accelerator, run_dir = start_job(VictimConfig, __doc__, "configs/victim/", "model.width=0.5", argv)
    rc = guarded(lambda: train_victim(cfg, accelerator, run_dir), log)

Exit codes shared by all scripts: 2 = bad config or input (argparse's convention), 3 = a non-finite loss stopped
training (the last good checkpoint is kept).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Type, TypeVar

from uedist.config import ConfigError, load_config, save_config
from uedist.dist import make_accelerator, setup_logging

C = TypeVar("C")


def start_job(schema: Type[C], doc: Optional[str], config_dir: str, example: str, argv: Optional[List[str]] = None,
              default_config: Optional[str] = None, fixed: Tuple[str, ...] = (),
              check: Optional[Callable[[C], Optional[str]]] = None) -> Tuple[C, Any, Path]:
    """Parse the command line into a ``schema`` config (``fixed`` overrides come first), then start the job.
    ``check(cfg)`` may return an error message that stops the script like a config error."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML ({config_dir})" + (f"; default {default_config}" if default_config else ""))
    p.add_argument("overrides", nargs="*", help=f"key=value, e.g. {example}")
    args = p.parse_args(argv)
    try:
        cfg = load_config(schema, args.config or default_config, [*fixed, *args.overrides])
    except ConfigError as e:
        p.error(str(e))
    problem = check(cfg) if check else None
    if problem:
        p.error(problem)
    accelerator = make_accelerator()
    run_dir = Path(cfg.run_root) / cfg.name  # type: ignore[attr-defined]
    setup_logging(run_dir)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    return cfg, accelerator, run_dir


def guarded(fn: Callable[[], Any], log: logging.Logger, input_errors: Tuple[Type[BaseException], ...] = ()) -> Any:
    """Run the job; a non-finite loss -> exit code 3, a checkpoint of another config or data, or one of
    ``input_errors`` -> exit code 2 (logged, not a traceback). Returns the job's result, or the exit code as an
    ``int``."""
    from uedist.engine.loop import CheckpointMismatch, NonFiniteLoss

    try:
        return fn()
    except NonFiniteLoss as e:
        log.error("%s", e)
        return 3
    except CheckpointMismatch as e:  # another config or rebuilt data under the same run name: nothing resumed
        log.error("%s", e)
        return 2
    except input_errors as e:  # type: ignore[misc]
        log.error("%s", e)
        return 2
