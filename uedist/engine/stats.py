"""Running float64 sums and maxima of a pass, kept per rank on its device and combined across ranks at the end."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch


class RunningSums:
    """Named float64 sums (``add``) and maxima (``maximum``) on ``device``; ``result`` combines them over ranks.

    >>> s = RunningSums(device, sums=("n", "l2"), maxima=("linf",))
    >>> s.add(n=b, l2=norms.sum()); s.maximum(linf=linf.max())
    >>> s.result(accelerator)  # {"n": ..., "l2": ..., "linf": ...}: sums summed, maxima maxed over ranks
    """

    def __init__(self, device: torch.device, *, sums: Sequence[str] = (), maxima: Sequence[str] = ()) -> None:
        self.sum_names, self.max_names = list(sums), list(maxima)
        self.sums = torch.zeros(len(self.sum_names), dtype=torch.float64, device=device)
        self.maxima = torch.full((len(self.max_names),), float("-inf"), dtype=torch.float64, device=device)
        self.totals: Optional[Dict[str, List[Optional[float]]]] = None  # set_totals: a finished pass's figures

    def add(self, **values: Any) -> None:
        """Add numbers or 0-d tensors to the named sums."""
        for k, v in values.items():
            self.sums[self.sum_names.index(k)] += torch.as_tensor(v, dtype=torch.float64, device=self.sums.device)

    def maximum(self, **values: Any) -> None:
        """Raise the named maxima to ``values`` where larger."""
        for k, v in values.items():
            i = self.max_names.index(k)
            v = torch.as_tensor(v, dtype=torch.float64, device=self.maxima.device)
            self.maxima[i] = torch.maximum(self.maxima[i], v)

    def take(self) -> Dict[str, List[Optional[float]]]:
        """This rank's sums and maxima since the last ``take`` (JSON-able: a maximum never raised is None), then
        zeroed: what a map pass stores in each shard's record, so a resumed pass still reports the whole set."""
        out = {"sums": self.sums.tolist(), "maxima": [None if v == float("-inf") else v for v in self.maxima.tolist()]}
        self.sums.zero_()
        self.maxima.fill_(float("-inf"))
        return out

    @staticmethod
    def combine(parts: Sequence[Dict[str, List[Optional[float]]]]) -> Dict[str, List[Optional[float]]]:
        """Several ``take()`` results as one: sums added, maxima maxed."""
        sums = [sum(col) for col in zip(*(p["sums"] for p in parts))]
        maxima = [max((v for v in col if v is not None), default=None) for col in zip(*(p["maxima"] for p in parts))]
        return {"sums": sums, "maxima": maxima}

    def set_totals(self, totals: Dict[str, List[Optional[float]]]) -> None:
        """Make :meth:`result` return ``totals`` (already over every rank and every run: e.g. a finished map pass's
        manifest) instead of combining this rank's own sums."""
        if len(totals["sums"]) != len(self.sum_names) or len(totals["maxima"]) != len(self.max_names):
            raise ValueError(f"totals {totals} do not match sums {self.sum_names} and maxima {self.max_names}")
        self.totals = totals

    def result(self, accelerator: Any) -> Dict[str, float]:
        """Collective (every rank calls it): the sums summed and the maxima maxed over all ranks (or the totals
        set by :meth:`set_totals`)."""
        totals = self.totals
        if totals is not None:
            maxima = [float("-inf") if v is None else v for v in totals["maxima"]]
            return {**dict(zip(self.sum_names, totals["sums"])), **dict(zip(self.max_names, maxima))}
        sums, maxima = self.sums.clone(), self.maxima.clone()
        if accelerator.num_processes > 1:
            if len(sums):
                sums = accelerator.reduce(sums, reduction="sum")
            if len(maxima):
                maxima = accelerator.gather(maxima[None]).amax(0)
        return {**dict(zip(self.sum_names, sums.tolist())), **dict(zip(self.max_names, maxima.tolist()))}
