"""How many images go into one forward of the inner loops (EOT draws, PGD, the final pass), and the loops' draws.

The inner loops treat their J·B images as independent: the surrogate is in eval mode and its parameters frozen, so
each image's input gradient is its own, whatever else shares the forward. They may therefore run in chunks of
``chunk`` images (the losses are per-image sums, so no chunk-size factor enters the gradient; the draws are made
once for all J·B images before chunking, so the RNG stream does not depend on it). A convolution kernel may round
an image's gradient differently at another batch size (≤ 5e-8 in our checks), which signed steps absorb: the
L∞ δ of SEM / REM / EM and L∞ PGD come out bit-identical at every chunk tested (tests/test_speed.py); an L2 PGD
step, which uses the gradient's values, agrees to float rounding.
The chunk size is a speed knob only (``default_chunk``):

- on a GPU large batches win: the default is all J·B images in one forward;
- on a CPU the per-image cost grows past a cache-sized batch (measured on this project's 2-core CPU,
  ResNet-18 full width, forward + input-backward: fp32 101 img/s at 32 images, 79 at 128, 71 at 640; bf16 +
  channels_last 303 at 128, 210 at 640 — docs/speed.md), so the default is that measured size, as pixels per
  forward. It is a fixed rule rather than a timing at start-up: a forward of one image may take another
  convolution kernel than a forward of many (one δ value of 18,432 differed in our check), so the chunk must not
  vary between two runs of one config if their outputs are to be byte-identical.

``inner_batch`` in the noise / victim configs sets the chunk explicitly (0 = the default above).
Random draws go through :func:`uniform` / :func:`normal`: made on the generator's device (a CUDA generator
draws on the GPU, no host RNG or host-to-device copy per inner step); with a CPU generator they are the same
numbers as ``torch.rand(shape, generator=gen)``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def _device(gen: Optional[torch.Generator], like: torch.Tensor) -> torch.device:
    return gen.device if gen is not None else like.device


def uniform(shape: Sequence[int], gen: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) of ``shape`` (float32) drawn on the generator's device, then moved to ``like``'s device/dtype."""
    return torch.rand(tuple(shape), generator=gen, device=_device(gen, like)).to(like)


def normal(shape: Sequence[int], gen: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """N(0, 1) of ``shape`` drawn on the generator's device, then moved to ``like``'s device/dtype."""
    return torch.randn(tuple(shape), generator=gen, device=_device(gen, like)).to(like)


def spans(n: int, chunk: int) -> Iterator[slice]:
    """Consecutive slices of at most ``chunk`` (0 = all n) covering range(n)."""
    step = n if chunk <= 0 else chunk
    for i in range(0, n, max(step, 1)):
        yield slice(i, min(i + step, n))


def input_grad(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    chunk: int = 0,
    scale: float = 1.0,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """∂(scale · Σ_i loss(f(x_i), y_i))/∂x, computed ``chunk`` images at a time (0 = one forward).

    ``loss_fn(logits, y)`` must return the *sum* over its batch (default: cross-entropy, reduction sum), so a
    chunk's gradient is that chunk's rows of the unchunked one (to the kernels' rounding)."""
    loss_fn = loss_fn or (lambda z, t: F.cross_entropy(z, t, reduction="sum"))
    n = x.shape[0]
    if chunk <= 0 or chunk >= n:
        xi = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(forward(xi), y) * scale, xi)
        return g
    g = torch.empty_like(x)
    for s in spans(n, chunk):
        xi = x[s].detach().requires_grad_(True)
        (g[s],) = torch.autograd.grad(loss_fn(forward(xi), y[s]) * scale, xi)
    return g


# Pixels per forward on a CPU (images × H × W), measured on this project's 2-core Xeon (AMX), ResNet-18 full width,
# forward + input-backward (launch/bench/noise.py, docs/speed.md): fp32 peaks at 32 images of 32² (101 img/s; 79
# at 128, 71 at 640), bf16 + channels_last at 128 of 32² (303 img/s; 210 at 640); at 224² 2-4 images are best.
CPU_PIXELS = {False: 32 * 32 * 32, True: 128 * 32 * 32}
CPU_MIN_IMAGES = 4


def default_chunk(n: int, *, device: torch.device, image_hw: Tuple[int, int], bf16: bool) -> int:
    """Images per forward for a loop over ``n`` images of ``image_hw`` when the config leaves it to us (0): all of
    them on a GPU (large batches win there); on a CPU the measured cache-sized batch, ``CPU_PIXELS`` / (H·W) images
    (at least ``CPU_MIN_IMAGES``). A fixed rule, not a per-run timing, so two runs of one config chunk alike."""
    if device.type != "cpu":
        return 0
    per = max(CPU_PIXELS[bool(bf16)] // max(image_hw[0] * image_hw[1], 1), CPU_MIN_IMAGES)
    return 0 if per >= n else per
