"""Fold eval-mode BatchNorm into the convolution before it, for the frozen surrogate of the inner loops.

In eval mode a BatchNorm2d is an affine map per channel, y = γ (x − μ) / √(σ² + ε) + β, so a Conv2d → BatchNorm2d
pair equals one Conv2d with scaled weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``). The noise
loops (SEM / REM δ steps, PGD, the final pass) run the surrogate in eval mode with frozen parameters, so folding
removes every BatchNorm forward and backward from them: the same function to float rounding (max |Δ logit|
≈1e-6 measured), fewer kernels. The surrogate's weights change every training step, so the fold is redone per δ
computation (an fx trace and a few tensor ops per convolution: ~0.1 s at full width against seconds of
forwards). A model that fx cannot trace, or a pair whose convolution output feeds anything else, stays unfolded.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` (sharing the unfolded parameters) with each Conv2d → BatchNorm2d folded;
    ``model`` itself when fx cannot trace it or nothing folds. ``model`` must be in eval mode."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (train-mode BatchNorm uses batch statistics)")
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # data-dependent control flow: keep the model as it is
        return model
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        prev = node.args[0]
        conv = modules.get(prev.target) if isinstance(prev, torch.fx.Node) and prev.op == "call_module" else None
        bn = modules[node.target]
        if not isinstance(conv, nn.Conv2d) or len(prev.users) != 1 or not bn.track_running_stats:
            continue
        with torch.no_grad():
            fused = fuse_conv_bn_eval(conv, bn)
        parent, _, name = prev.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    if not folded:
        return model
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()
