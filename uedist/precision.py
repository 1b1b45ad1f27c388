"""The fast defaults: bf16 autocast and channels_last where the device runs them natively.

``bf16: null`` / ``channels_last: null`` in a noise or victim config (the default) mean *auto*:

- bf16 is on for a CUDA device that supports bfloat16 (compute capability ≥ 8.0) and for a CPU with AMX or
  AVX-512 BF16 (measured on this project's 2-core Xeon with AMX, ResNet-18 full width, 32 px: 90 → 296 img/s for
  the noise loop's forward + input-backward, 55 → 168 img/s for a training step; docs/speed.md); off elsewhere,
  where bf16 is emulated and slower than fp32;
- channels_last is on wherever bf16 is (the layout oneDNN and cuDNN's bf16 convolutions want), and off otherwise.

bf16 changes the numbers a run produces (δ differs from fp32's in a fraction of pixels, docs/speed.md), so the
resolved values are written into each run's metrics; set ``bf16=false channels_last=false`` for fp32.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch


def bf16_native(device: torch.device) -> bool:
    """True when ``device`` runs bf16 matmuls/convolutions in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
            fn = getattr(cpu, probe, None)
            if fn is not None and fn():
                return True
    return False


def use_bf16(setting: Optional[bool], device: torch.device) -> bool:
    """``setting`` when given, else :func:`bf16_native`."""
    return bf16_native(device) if setting is None else bool(setting)


def use_channels_last(setting: Optional[bool], device: torch.device) -> bool:
    """``setting`` when given, else on wherever bf16 is native."""
    return bf16_native(device) if setting is None else bool(setting)


def amp_args(setting: Optional[bool], device: torch.device) -> Dict[str, Any]:
    """Keyword arguments of ``torch.autocast`` for a config's ``bf16`` setting on ``device``."""
    return {"device_type": device.type, "dtype": torch.bfloat16, "enabled": use_bf16(setting, device)}


def resolved(cfg: Any, device: torch.device) -> Dict[str, bool]:
    """{"bf16": …, "channels_last": …} as a run on ``device`` uses them (for metrics and logs)."""
    return {
        "bf16": use_bf16(cfg.bf16, device),
        "channels_last": use_channels_last(cfg.channels_last, device),
    }
