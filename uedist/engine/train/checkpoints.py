"""Resume and checkpoint a step-based training run (docs/architecture.md, "The training loop"): the per-run
:class:`Checkpointer` (resume-by-default, periodic atomic checkpoints, refused on another config or other data),
the non-finite-loss guards, what a checkpoint records of its config and data, and the BatchNorm buffer sync
before one is written. :mod:`uedist.engine.train.loop` builds the loop on these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from uedist.checkpoint import CheckpointError, latest_checkpoint, load_state, restore_rng, save_checkpoint
from uedist.config import config_to_dict, identity
from uedist.dist import get_logger

log = get_logger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the run stops and keeps its last good checkpoint."""


def check_finite(loss: torch.Tensor, step: int, *, accelerator: Any, ckpt_dir: Path) -> None:
    """Before the update: raise NonFiniteLoss on every rank if the loss is not finite on any rank (so no rank
    hangs in the next collective and no update is applied)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        last = latest_checkpoint(ckpt_dir)
        raise NonFiniteLoss(
            f"loss is {loss.item()} at step {step}; stopping. Last good checkpoint: "
            f"{last if last else 'none yet'} (lower the learning rate, or check the data)"
        )


def check_finite_params(model: torch.nn.Module, step: int, ckpt_dir: Path) -> None:
    """Before a checkpoint: never save weights that already overflowed."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            last = latest_checkpoint(ckpt_dir)
            raise NonFiniteLoss(
                f"parameter {name} is not finite at step {step}; not saving it. Last good "
                f"checkpoint: {last if last else 'none yet'}"
            )


class CheckpointMismatch(ValueError):
    """A run's newest checkpoint was written with another training config or on other data: never resumed."""


class Checkpointer:
    """Resume-by-default and periodic checkpoints for one run (``<run_dir>/checkpoints``)."""

    def __init__(
        self,
        run_dir: Path,
        accelerator: Any,
        *,
        every: int,
        keep: int = 2,
        gens: Optional[Dict[str, torch.Generator]] = None,
        data: Optional[Dict[str, str]] = None,
    ) -> None:
        """``data``: the content digests of the run's input shard sets (:func:`data_digests`), saved with every
        checkpoint; a checkpoint saved with other digests (a training set rebuilt in place since, e.g. by a newer
        synthetic generator) is refused on resume instead of continuing a model trained on other pictures."""
        self.dir = Path(run_dir) / "checkpoints"
        self.acc, self.every, self.keep, self.gens = accelerator, every, keep, gens or {}
        self.data = data

    def load_latest(self, *, config: Any = None) -> Optional[tuple]:
        """``(path, state)`` of the newest checkpoint, or None; refused (:class:`CheckpointMismatch`) when it was
        written with a different config (:func:`uedist.config.identity`: runtime fields such as ``progress`` or
        ``data.workers`` may differ) or on other data, never silently mixed."""
        path = latest_checkpoint(self.dir)
        if path is None:
            return None
        state = load_state(path, map_location="cpu")
        if config is not None and state.get("identity") is not None and state["identity"] != identity(config):
            raise CheckpointMismatch(
                f"{path} was written with a different config; use a new run name, or delete {self.dir.parent} to "
                "start over"
            )
        saved = state.get("data_digests")
        if self.data is not None and saved is not None and saved != self.data:
            changed = sorted(k for k in set(saved) | set(self.data) if saved.get(k) != self.data.get(k))
            raise CheckpointMismatch(
                f"{path} was trained on other data: data.{', data.'.join(changed)} changed since (rebuilt "
                f"in place?); use a new run name, or delete {self.dir.parent} to start over"
            )
        return path, state

    def restore_rng(self, path: Path) -> None:
        if not restore_rng(path, self.acc.process_index, self.gens):
            log.warning(
                "%s has no RNG state for rank %d (different world size?): RNG not restored",
                path,
                self.acc.process_index,
            )

    def resume(
        self,
        model: torch.nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler: Any = None,
        *,
        config: Any = None,
    ) -> Optional[Dict[str, Any]]:
        """Load the newest checkpoint (:meth:`load_latest`) into the (unwrapped) model, optimizer and scheduler;
        restore the RNG; return its state or None."""
        found = self.load_latest(config=config)
        if found is None:
            return None
        path, state = found
        try:  # a state.pt with missing keys or values of other types: refused naming it, never half-loaded
            model.load_state_dict(state["model"])
            if optimizer is not None and "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and "scheduler" in state:
                scheduler.load_state_dict(state["scheduler"])
            int(state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            first = " ".join(str(e).strip().splitlines()[:1])[:200]
            raise CheckpointError(
                f"{path / 'state.pt'}: not a checkpoint of this run's model and optimizer ({type(e).__name__}: "
                f"{first}); delete {path} to resume from the one before, or {self.dir.parent} to start over"
            ) from None
        self.restore_rng(path)
        log.info("resumed from %s (step %d)", path, state["step"])
        return state

    def due(self, step: int, total: int) -> bool:
        return step == total or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: Dict[str, Any]) -> Path:
        if self.data is not None:
            state = {**state, "data_digests": self.data}
        return save_checkpoint(
            self.dir,
            step,
            state,
            rank=self.acc.process_index,
            barrier=self.acc.wait_for_everyone,
            gens=self.gens,
            keep=self.keep,
        )


def data_digests(config: Any) -> Dict[str, str]:
    """The content digest of every finished shard set that ``config``'s ``data`` section names ({key: digest})."""
    from uedist.data.manifest import content_digest

    data = config_to_dict(config).get("data") if not isinstance(config, dict) else config.get("data")
    if not isinstance(data, dict):
        return {}
    return {k: d for k, v in sorted(data.items()) if isinstance(v, str) and v and (d := content_digest(v))}


def config_state(config: Any) -> Dict[str, Any]:
    """What a checkpoint records of its config: the whole of it (to rebuild the model) and its identity (to
    guard a resumption)."""
    return {"config": config_to_dict(config), "identity": identity(config)}


def sync_buffers(model: torch.nn.Module, accelerator: Any) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats), as DDP does only at the *next* forward:
    without this each rank would evaluate, and resume, with its own statistics."""
    if accelerator.num_processes > 1:
        for b in model.buffers():
            torch.distributed.broadcast(b.data, src=0)
