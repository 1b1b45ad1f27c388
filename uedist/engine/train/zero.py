"""The DeepSpeed ZeRO backend of the training loop: :func:`prepare_deepspeed` returns the same
:class:`~uedist.engine.train.loop.Prepared` as ``prepare_training``, so
:func:`~uedist.engine.train.loop.run_steps` drives either; only the update (``engine.backward`` / ``engine.step``)
and the checkpoint (ZeRO partitions gathered) differ.

Run under ``torchrun`` (or any launcher that sets RANK / WORLD_SIZE): the Accelerator then owns the process group
(gloo on CPU, NCCL on GPUs) and ``deepspeed.initialize`` reuses it (Accelerate's DeepSpeed plugin does not work on
CPU: it needs ``transformers``, then miscounts the processes). The optimizer is torch Adam handed to DeepSpeed
(no compiled ops); the LR schedule stays ours and is stepped by the loop, as under DDP. Checkpoints are ours,
world-size independent and weights_only-loadable: the full fp32 master weights and Adam moments gathered from the
ZeRO partitions (``safe_get_full_*``), schedule, RNG, step; on resume they are scattered back (``safe_set_full_*``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

from uedist.dist import get_logger
from uedist.engine.train.checkpoints import Checkpointer, config_state, data_digests
from uedist.engine.train.loop import OptimConfig, Prepared, make_scheduler

log = get_logger(__name__)


def deepspeed_config(path: str, *, batch_size: int, world: int, grad_clip: float) -> Dict[str, Any]:
    """The JSON at ``path`` with the batch sizes and clipping of our config (which win over the file's)."""
    ds = json.loads(Path(path).read_text())
    ds.update(
        train_batch_size=batch_size,
        train_micro_batch_size_per_gpu=batch_size // world,
        gradient_accumulation_steps=1,
        gradient_clipping=grad_clip,
    )
    return ds


def prepare_deepspeed(
    model: torch.nn.Module,
    optim: OptimConfig,
    total_steps: int,
    *,
    ds_config: Dict[str, Any],
    accelerator: Any,
    ckpt_root: Path,
    seed: int,
    config: Any,
    ckpt_every: int,
    resume: bool = True,
    gen_name: str = "train",
) -> Prepared:
    """Adam (lr ``optim.lr``) under DeepSpeed ZeRO (stage and bf16 from ``ds_config``), our schedule, this rank's
    generator and the newest checkpoint under ``ckpt_root`` (by default; refused on another config or data)."""
    import deepspeed

    device, rank = accelerator.device, accelerator.process_index
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    ckpt = Checkpointer(ckpt_root, accelerator, every=ckpt_every, gens={gen_name: gen}, data=data_digests(config))
    found = ckpt.load_latest(config=config) if resume else None
    if found is not None:
        model.load_state_dict(found[1]["model"])  # the module's (bf16) copy; the fp32 master is restored below
    opt = torch.optim.Adam(model.parameters(), lr=optim.lr)
    sched = make_scheduler(opt, optim, max(total_steps, 1))
    engine, zero_opt, _, _ = deepspeed.initialize(model=model.to(device), optimizer=opt, config=ds_config)
    named = list(engine.module.named_parameters())
    p = Prepared(engine.module, engine, zero_opt, sched, gen, ckpt, 0, [], 0.0, config, accelerator=accelerator)
    p.wrapper = f"DeepSpeedEngine(ZeRO-{engine.zero_optimization_stage()})"
    if found is not None:
        _restore(p, named, path=found[0], state=found[1])

    def update(loss: torch.Tensor, clip: float) -> None:  # clipping: the JSON's gradient_clipping
        engine.backward(loss)
        engine.step()

    def save(step: int, elapsed: float, extra: Dict[str, Any]) -> None:
        _save(p, named, step=step, elapsed=elapsed, extra=extra)

    p.update_fn, p.save_fn = update, save
    return p


def _restore(p: Prepared, named: list, *, path: Path, state: Dict[str, Any]) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    device = p.accelerator.device
    _init_zero_adam_state(p.opt, state["adam"]["step"])
    for name, prm in named:
        safe_set_full_fp32_param(prm, state["master"][name].to(device))
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(prm, state["adam"][key][name].to(device), key)
    p.sched.load_state_dict(state["scheduler"])
    for g, lr in zip(p.opt.param_groups, p.sched.get_last_lr()):
        g["lr"] = lr  # the optimizer's lr is otherwise the schedule's value at step 0 until the next step
    p.ckpt.restore_rng(path)
    p.start, p.curve, p.elapsed = state["step"], list(state["curve"]), float(state["elapsed"])
    log.info("resumed from %s (step %d)", path, p.start)


def _save(p: Prepared, named: list, *, step: int, elapsed: float, extra: Dict[str, Any]) -> None:
    """Collective: every rank gathers the partitions of the fp32 master weights and the Adam moments."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    master = {n: safe_get_full_fp32_param(q).cpu() for n, q in named}
    adam = {k: {n: safe_get_full_optimizer_state(q, k).cpu() for n, q in named} for k in ("exp_avg", "exp_avg_sq")}
    steps = [st["step"] for st in p.opt.optimizer.state.values()]
    adam["step"] = torch.as_tensor(steps[0]).clone() if steps else torch.tensor(0.0)
    p.ckpt.save(
        step,
        {
            "model": {k: v.float() for k, v in p.model.state_dict().items()},
            "master": master,
            "adam": adam,
            "scheduler": p.sched.state_dict(),
            "curve": p.curve,
            "elapsed": elapsed,
            **config_state(p.config),
            **extra,
        },
    )


def _init_zero_adam_state(zero_opt: Any, step: torch.Tensor) -> None:
    """Create Adam's state on ZeRO-1/2's flat fp32 partitions before the first step (torch Adam creates it lazily,
    DeepSpeed links it to the parameters after the first step), so a resumed run can scatter saved moments into
    it. Touches ZeRO-1/2 internals (``single_partition_of_fp32_groups``, ``_lazy_init_hp_params_optimizer_state``)."""
    for flat in zero_opt.single_partition_of_fp32_groups:
        zero_opt.optimizer.state[flat] = {
            "step": step.clone().float(),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    zero_opt._lazy_init_hp_params_optimizer_state()
