"""Exponential moving average of a model's weights (DDPM samples with EMA weights, decay 0.9999)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ after each update; with ``warmup``, d = min(decay, (1 + n) / (10 + n)) after n
    updates, so a short run is not dominated by its random initialization. Buffers are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False) -> None:
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow: Dict[str, torch.Tensor] = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                s.mul_(d).add_(v.detach().to(s), alpha=1 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> Dict[str, object]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.updates = int(state["updates"])  # type: ignore[arg-type]
        for k, v in state["shadow"].items():  # type: ignore[union-attr]
            self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into ``model`` (same architecture); returns it."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})
        return model
