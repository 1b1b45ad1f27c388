"""The inner loops' two speed knobs, shared by the noise stages and the victim's adversarial training:
``forward_fn`` (autocast, optional ``torch.compile``) and ``inner_chunk`` (images per forward,
``uedist.ops.batching``). The chunk never changes δ; compile may change kernel rounding (docs/speed.md)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from uedist.models.fold import fold_batchnorm
from uedist.ops import batching


def forward_fn(
    cfg: Any, model: torch.nn.Module, amp: Dict[str, Any], *, fold: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images in [0, 1] -> float32 logits under ``amp`` autocast, through ``torch.compile`` when ``cfg.compile``
    (one compiled module per model, kept on it; recompiles per input shape / train-eval mode, as Dynamo guards).
    ``fold`` (for a frozen eval-mode model, with ``cfg.fold_bn`` and without compile): BatchNorm folded into the
    convolutions first (``uedist.models.fold``), kept on the model until one of its parameters or buffers changes
    (their in-place version counters: an optimizer step, a train-mode BN update, a load), so the δ steps and the
    surrogate's PGD of one training step share one fold, and a frozen final pass folds once."""
    net = model
    if fold and getattr(cfg, "fold_bn", False) and not getattr(cfg, "compile", False) and not model.training:
        net = _folded(model)
    elif getattr(cfg, "compile", False):
        net = model.__dict__.get("_uedist_compiled")
        if net is None:
            net = torch.compile(model)
            model.__dict__["_uedist_compiled"] = net

    def fwd(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(**amp):
            return net(z).float()

    return fwd


def _folded(model: torch.nn.Module) -> torch.nn.Module:
    tensors = [*model.parameters(), *model.buffers()]
    key = tuple((id(t), t._version) for t in tensors)
    cached = model.__dict__.get("_uedist_folded")
    if cached is not None and cached[0] == key:
        return cached[1]
    net = fold_batchnorm(model)
    if net is not model and any(t.dim() == 4 and not t.is_contiguous() for t in model.parameters()):
        net = net.to(memory_format=torch.channels_last)  # the model is channels_last: so is its folded copy
    model.__dict__["_uedist_folded"] = (key, net)
    return net


def inner_chunk(cfg: Any, x: torch.Tensor, *, n: int, bf16: bool, out_hw: Optional[Tuple[int, int]] = None) -> int:
    """Images per forward for an inner loop of ``n`` images made from the batch ``x`` (of ``out_hw`` pixels after
    the EOT augmentation, default x's): the config's ``inner_batch`` when set, else
    :func:`uedist.ops.batching.default_chunk` (all on a GPU, the measured cache-sized batch on a CPU)."""
    setting = int(getattr(cfg, "inner_batch", 0))
    if setting > 0:
        return setting
    hw = out_hw or (int(x.shape[-2]), int(x.shape[-1]))
    return batching.default_chunk(n, device=x.device, image_hw=hw, bf16=bf16)
