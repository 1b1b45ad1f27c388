"""Shared parts of the benchmark scripts (``launch/bench/*.py``): one timing rule, FLOP counting, device and
precision setup, synthetic inputs, the training / inference steps they time, and the JSON + Markdown report.

A script builds a :class:`Setting` (device, bf16, quick), makes closures with the ``*_steps`` builders below,
times them with :func:`timed`, renders rows with :func:`markdown_table` and writes both files with
:func:`write_report`. Nothing here is used by training code: numbers from these functions are measurements,
not results.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from uedist.config import load_config
from uedist.data.build import BuildConfig, build_shard_sets
from uedist.data.manifest import Manifest
from uedist.diffusion.ema import EMA
from uedist.diffusion.schedule import Schedule
from uedist.io import atomic_write_json, atomic_write_text
from uedist.models.dvae import dvae_loss
from uedist.ops.images import to_uint8
from uedist.ops.pgd import pgd

Step = Callable[[], Any]


# ----------------------------------------------------------------------------------------------------------- timing
class Case(NamedTuple):
    """One timed benchmark case: ``fn()`` processes ``images`` images; ``what`` says how, for the table. The
    stage's per-image work is ``factor`` calls' worth (a call timing a representative slice of a longer pass)."""

    fn: Step
    images: int
    what: str
    factor: float = 1


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_calls(fn: Step, min_time: float, max_iters: int) -> tuple[float, int]:
    """(seconds per call, calls timed) of ``fn``: one warm-up call, then calls until ``min_time`` seconds or
    ``max_iters`` calls (at least one). A warm-up call slower than 4 × ``min_time`` (REM at 224 px on a CPU) is
    its own measurement (calls timed: 1). CUDA work is synchronized before the clock is read."""
    t0 = time.perf_counter()
    fn()
    _sync()
    first = time.perf_counter() - t0
    if first > 4 * min_time > 0:
        return first, 1
    n, t0 = 0, time.perf_counter()
    while n < max_iters and (n == 0 or time.perf_counter() - t0 < min_time):
        fn()
        n += 1
    _sync()
    return (time.perf_counter() - t0) / n, n


def timed(fn: Step, min_time: float, max_iters: int) -> float:
    """Seconds per call of ``fn`` (see :func:`timed_calls`)."""
    return timed_calls(fn, min_time, max_iters)[0]


def count_flops(fn: Step) -> float:
    """FLOPs of one call of ``fn``, from torch's per-op formulas (conv, matmul, attention; forward and backward,
    as executed). A plain dispatch mode: FlopCounterMode's module hooks break ``torch.autograd.grad`` on leaf
    inputs, which the noise steps use."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    total = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            f = flop_registry.get(func._overloadpacket)
            if f is not None:
                total[0] += f(*args, **kwargs, out_val=out)
            return out

    with Count():
        fn()
    return float(total[0])


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an (n × n) @ (n × n) matrix product: the practical peak of a device without a datasheet."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, 1.0, 50)


def fmt_duration(s: float) -> str:
    """Seconds as a short human duration: ``"42 s"``, ``"17 min"``, ``"3.5 h"``, ``"2.1 d"``."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


# ----------------------------------------------------------------------------------------- device and precision
def device_name(device: torch.device) -> str:
    """The GPU's name, else the CPU's (``platform.processor()``, else the machine type)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a benchmark ran on: device name and type, intra-op threads, torch and Python versions."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def autocast_args(device: torch.device, bf16: bool) -> dict[str, Any]:
    """Keyword arguments of ``torch.autocast``: bf16 when ``bf16``, else a disabled context (fp32)."""
    return {"device_type": device.type, "dtype": torch.bfloat16, "enabled": bf16}


@dataclass(frozen=True)
class Setting:
    """Where and how a benchmark runs: ``device``, bf16 autocast with channels_last (``bf16``), and ``quick``
    (smoke-test sizes and one timed call: checks a script runs, measures nothing)."""

    device: torch.device
    bf16: bool = False
    quick: bool = False

    @property
    def amp(self) -> dict[str, Any]:
        return autocast_args(self.device, self.bf16)

    @property
    def precision(self) -> str:
        return "bf16+cl" if self.bf16 else "fp32"

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on the device, channels_last under bf16 (the fast layout for bf16 convolutions)."""
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.bf16 else module

    def batch(self, gpu: int, cpu: int) -> int:
        """Batch size: 1 in quick mode, else ``gpu`` on CUDA and ``cpu`` elsewhere."""
        return 1 if self.quick else (gpu if self.device.type == "cuda" else cpu)

    def limits(self, min_time: float, max_iters: int) -> tuple[float, int]:
        """(min_time, max_iters) for :func:`timed`: (0, 1) in quick mode."""
        return (0.0, 1) if self.quick else (min_time, max_iters)


# ------------------------------------------------------------------------------------------------------- inputs
def fake_manifest(px: int, num_classes: int) -> Manifest:
    """A manifest of an empty ``px`` × ``px`` PNG train set with ``num_classes`` classes (for model builders)."""
    return Manifest("bench", "train", [str(i) for i in range(num_classes)], (px, px), "png", [])


def random_batch(
    batch: int, px: int, num_classes: int, *, device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform images x (B, 3, px, px) in [0, 1] and labels y (B,) in [0, num_classes)."""
    x = torch.rand(batch, 3, px, px, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, num_classes, (batch,), device=device)


def build_synthetic_set(
    out: Path, *, num_train: int, size: int, shard_size: int, encoding: str = "png", workers: int = 0
) -> Path:
    """A synthetic train shard set of ``num_train`` ``size`` px images under ``out``; returns ``out/train``.
    Reused when ``out`` already holds one built with the same settings."""
    over = [f"out={out}", "splits=[train]", f"synthetic.num_train={num_train}", f"synthetic.size={size}"]
    over += [f"shard_size={shard_size}", f"encoding={encoding}", f"workers={workers}"]
    build_shard_sets(load_config(BuildConfig, None, over), progress=False)
    return Path(out) / "train"


class PlainFolder(Dataset):
    """``root/<class>/<file>`` images decoded with PIL -> {"image": uint8 (3, H, W), "label": int}: the plain
    ``ImageFolder``-style baseline the shard loaders are compared with."""

    def __init__(self, root: Path) -> None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.files[i]
        with Image.open(path) as img:
            arr = np.array(img.convert("RGB"))  # writable copy, as torch wants
        return {"image": torch.from_numpy(arr).permute(2, 0, 1), "label": label}


def loader_rate(make: Callable[[], Iterable], *, min_time: float, warm_epoch: bool = False) -> dict[str, float]:
    """Steady-state images/s of a re-iterable loader of ``{"label": (B,), ...}`` batches. ``make()`` builds it; it
    is warmed up (2 batches, or a whole epoch with ``warm_epoch``: FFCV compiles then), then whole epochs run
    until ``min_time`` s are timed. An epoch is timed from the arrival of its first batch to that of its last and
    its first batch is not counted, so worker start-up (``first_batch_s``, the median) is excluded."""
    t0 = time.perf_counter()
    loader = make()
    for i, _ in enumerate(loader):
        if i == 1 and not warm_epoch:
            break
    setup = time.perf_counter() - t0
    images, spent, firsts = 0, 0.0, []
    while spent < min_time or not firsts:
        start = time.perf_counter()
        first = last = None
        for batch in loader:
            last = time.perf_counter()
            if first is None:
                first = last
                firsts.append(first - start)
            else:
                images += len(batch["label"])
        spent += last - first  # type: ignore[operator]
    return {
        "images_per_s": images / spent if spent > 0 else float("nan"),
        "first_batch_s": float(np.median(firsts)),
        "timed_images": images,
        "timed_s": spent,
        "setup_s": setup,
    }


# ------------------------------------------------------------------------------------------------- timed steps
def _update(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: float = 0.0) -> None:
    """zero_grad, backward, clip the gradient norm of ``opt``'s parameters to ``clip`` (when > 0), step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    opt.step()


def classifier_step(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    opt: torch.optim.Optimizer,
    amp: dict[str, Any],
    adv_steps: int = 0,
) -> Step:
    """One training update of a classifier on ``x`` (B, 3, H, W) in [0, 1], labels ``y`` (B,): cross-entropy,
    backward, ``opt`` step; with ``adv_steps`` > 0, on PGD-attacked inputs (L∞ ε 4/255, α 1/255: adversarial
    training)."""

    def fwd(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(**amp):
            return model(z).float()

    def step() -> None:
        xi = x
        if adv_steps:
            model.requires_grad_(False)
            xi = x + pgd(fwd, x, y, eps=4 / 255, alpha=1 / 255, steps=adv_steps)
            model.requires_grad_(True)
        _update(opt, F.cross_entropy(fwd(xi), y))

    return step


def noise_steps(
    cfg: Any, m: Manifest, *, batch: int, accelerator: Any, structure: str = "ours"
) -> dict[str, tuple[Step, int]]:
    """``{"surrogate step": (fn, passes), "final pass": (fn, passes)}`` for a ``NoiseConfig`` on a random batch at
    the manifest's size: the step is a fresh δ for the batch plus one adversarially trained SGD step of the
    surrogate (``surrogate_step``), the final pass δ alone; ``passes`` are forward+backward passes per image.
    ``structure="reference"``: the reference code's loop instead (:func:`reference_noise_delta`: J separate
    forwards of B per δ step, the PGD and the SGD step on B), at the config's precision."""
    from uedist.engine.noise import make_eot, noise_for_batch, surrogate_for, surrogate_step
    from uedist.precision import amp_args, use_channels_last

    device, amp = accelerator.device, amp_args(cfg.bf16, accelerator.device)
    cl = use_channels_last(cfg.channels_last, device)
    model = surrogate_for(cfg, m).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator(device=device).manual_seed(0)
    eot = make_eot(cfg, m, gen)
    x, y = random_batch(batch, m.image_size[0], m.num_classes, device=device, channels_last=cl)
    inner = cfg.adv_steps + 1 if cfg.method == "rem" else 1  # REM: a min-max, K_a attack steps inside each δ step
    final_passes = cfg.noise_steps * cfg.eot_samples * inner
    kw = {"ddp": model, "model": model, "opt": opt, "eot": eot, "gen": gen, "amp": amp, "accelerator": accelerator}
    kw.update(step=1, ckpt_dir=Path(tempfile.gettempdir()))  # where a non-finite loss would leave its report

    def delta() -> torch.Tensor:
        if structure == "reference":
            return reference_noise_delta(cfg, model, x, y, eot=eot, gen=gen, amp=amp)
        return noise_for_batch(cfg, model, x, y=y, eot=eot, gen=gen, amp=amp)

    def final() -> None:
        delta()

    def step() -> None:
        surrogate_step(cfg, x + delta(), y, **kw)

    return {"surrogate step": (step, final_passes + cfg.adv_steps + 1), "final pass": (final, final_passes)}


def reference_noise_delta(
    cfg: Any,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eot: Callable[[torch.Tensor], torch.Tensor],
    gen: torch.Generator,
    amp: dict[str, Any],
) -> torch.Tensor:
    """δ the way the REM/SEM reference code computes it (``robust_workers.py``: per δ step, J separate calls of
    B images, each ``t(x + δ)`` → inner perturbation → forward → mean cross-entropy → input gradient → ``(t(x+δ) ·
    g).sum().backward()`` accumulating into δ.grad), for the benchmark's side-by-side: the same algorithm and
    pass count as :func:`uedist.ops.noise.min_min_noise`, the reference's batching."""
    from uedist.ops.pgd import pgd

    eps, alpha = cfg.eps / 255, cfg.noise_step_size / 255
    r_eps, r_alpha = cfg.adv_eps / 255, cfg.adv_step_size / 255

    def fwd(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(**amp):
            return model(z).float()

    model.eval()
    model.requires_grad_(False)
    delta = ((torch.rand(x.shape, generator=gen, device=gen.device).to(x) * 2 - 1) * eps).requires_grad_(True)
    for _ in range(cfg.noise_steps):
        delta.grad = None
        for _ in range(cfg.eot_samples):
            def_x = eot((x + delta).clamp(0, 1))
            adv = def_x.detach()
            if cfg.method == "sem":
                adv = (adv + (torch.rand(adv.shape, generator=gen, device=gen.device).to(adv) * 2 - 1) * r_eps).clamp(
                    0, 1
                )
            elif cfg.method == "rem":
                adv = adv + pgd(fwd, adv, y, eps=r_eps, alpha=r_alpha, steps=cfg.adv_steps, gen=gen)
            adv.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(fwd(adv), y), adv)
            (def_x * g).sum().backward()
        with torch.no_grad():
            delta -= alpha * delta.grad.sign()
            delta.clamp_(-eps, eps)
    model.requires_grad_(True)
    model.train()
    return ((x + delta.detach()).clamp(0, 1) - x).detach()


def count_loss_rows() -> tuple[list[int], Callable[[], None]]:
    """([n], remove): n counts the images whose loss is taken (``F.cross_entropy``'s rows) from now until
    ``remove()``: every forward of the noise loops, the PGD and the training step ends in one, whichever module
    (the surrogate or a BatchNorm-folded copy of it) ran the forward."""
    n = [0]
    orig = F.cross_entropy

    def counting(logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        n[0] += int(logits.shape[0])
        return orig(logits, *args, **kwargs)

    torch.nn.functional.cross_entropy = counting

    def remove() -> None:
        torch.nn.functional.cross_entropy = orig

    return n, remove


def dvae_steps(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, amp: dict[str, Any], grad_clip: float = 1.0
) -> dict[str, Step]:
    """``{"train step", "inference"}`` of a D-VAE on ``x`` (B, 3, H, W) in [0, 1]: forward, Eq. 14 loss (with the
    p̂ floor), backward, gradient clip, Adam; and one sampled-z forward to the purified P = x − p̂ as uint8."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train() -> None:
        with torch.autocast(**amp):
            out = model(x, y)
        loss, _ = dvae_loss(type(out)(*(t.float() for t in out)), x, kld_limit=1.0, kld_weight=0.01, p_floor=0.002)
        _update(opt, loss, grad_clip)

    @torch.no_grad()
    def infer() -> None:
        with torch.autocast(**amp):
            out = model.eval()(x, y)
        to_uint8(x - out.p.float())
        model.train()

    return {"train step": train, "inference": infer}


def unet_steps(net: torch.nn.Module, x: torch.Tensor, *, amp: dict[str, Any]) -> dict[str, Step]:
    """``{"unet_fwd", "unet_fwd_bwd", "ddpm_train"}`` of an ε-prediction UNet on x (B, 3, H, W) in [-1, 1]: one
    forward (no grad); forward + backward of the DDPM loss ‖ε − ε_θ(√ᾱ x + √(1−ᾱ) ε, t)‖² (Ho et al. Eq. 14);
    a full training step (that loss, backward, clip 1.0, Adam, EMA update)."""
    opt, ema, s = torch.optim.Adam(net.parameters(), lr=1e-4), EMA(net), Schedule.linear(1000)
    t = torch.randint(0, s.T, (x.shape[0],), device=x.device)

    def fwd() -> None:
        with torch.no_grad(), torch.autocast(**amp):
            net.eval()(x, t)
        net.train()

    def loss() -> torch.Tensor:
        noise = torch.randn_like(x)
        with torch.autocast(**amp):
            return F.mse_loss(net(s.q_sample(x, t, noise), t).float(), noise)

    def fwd_bwd() -> None:
        net.zero_grad(set_to_none=True)
        loss().backward()

    def train() -> None:
        _update(opt, loss(), 1.0)
        ema.update(net)

    return {"unet_fwd": fwd, "unet_fwd_bwd": fwd_bwd, "ddpm_train": train}


def eps_model(net: torch.nn.Module, amp: dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``eps(z, t)``: the UNet's ε prediction in float32 under ``amp``, without gradients (for ``purify``)."""

    def eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(**amp):
            return net(z, t).float()

    return eps


# ------------------------------------------------------------------------------------------------------- report
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """The lines of a Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default all ``l``)."""
    align = align or "l" * len(header)
    assert len(align) == len(header), (align, header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def write_report(out: Path, name: str, result: dict[str, Any], *, markdown: str) -> tuple[Path, Path]:
    """Write ``out/<name>.json`` (``result``) and ``out/<name>.md`` (``markdown``), each atomically; returns both."""
    out = Path(out)
    return atomic_write_json(out / f"{name}.json", result), atomic_write_text(out / f"{name}.md", markdown)
