"""Published DDPM weights in the diffusers ``UNet2DModel`` layout, loaded into our UNet (no diffusers needed).

    net, kwargs = load_unet2d("weights/ddpm-cifar10-32")   # a folder: config.json + diffusion_pytorch_model.safetensors
    ddpm=weights/ddpm-cifar10-32                            # the same, from a JCDP / plain diffusion / DDPM config

Ho et al.'s CIFAR-10 model is published in this layout (the Hugging Face repository ``google/ddpm-cifar10-32``:
``config.json``, ``diffusion_pytorch_model.safetensors`` / ``.bin``, ``scheduler_config.json``). Our
:class:`uedist.models.unet.UNet` is the same network as diffusers' ``UNet2DModel`` with the DDPM options
(positional time embedding [sin | cos] with shift 1, SiLU, GroupNorm(32, eps 1e-6), asymmetric-padding strided
downsampling, single-head attention, ``AttnDownBlock2D`` where DDPM has attention): each weight maps one to one
(the attention's separate q, k, v linears are stacked into our 1×1 ``qkv`` conv). A config asking for anything
else is refused, naming the key. The ``.safetensors`` file is read with safetensors (no pickle); a ``.bin`` with
``torch.load(weights_only=True)``. The scheduler, when present, must be DDPM's linear β schedule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from uedist.models.unet import UNet

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_REQUIRED = {
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "norm_num_groups": 32,
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
}


def is_unet2d_folder(path: Any) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and any((p / f).is_file() for f in WEIGHT_FILES)


def unet_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    """Our UNet's arguments for a ``UNet2DModel`` config.json; an option our UNet does not have is an error."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"not a UNet2DModel config (_class_name {config.get('_class_name')!r})")
    for k, v in _REQUIRED.items():
        if k in config and config[k] != v:
            raise ValueError(f"UNet2DModel option {k}={config[k]!r} is not supported (our UNet is DDPM's: {k}={v!r})")
    if abs(float(config.get("norm_eps", 1e-6)) - 1e-6) > 1e-12:
        raise ValueError(f"UNet2DModel norm_eps={config['norm_eps']} is not supported (DDPM: 1e-6)")
    if config.get("attention_head_dim") not in (None,) and config.get("attention_head_dim") != max(
        config["block_out_channels"]
    ):
        raise ValueError("UNet2DModel multi-head attention (attention_head_dim) is not supported: DDPM has one head")
    chans = list(config["block_out_channels"])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if set(down) - {"DownBlock2D", "AttnDownBlock2D"} or set(up) - {"UpBlock2D", "AttnUpBlock2D"}:
        raise ValueError(f"UNet2DModel blocks {down} / {up}: only (Attn)DownBlock2D / (Attn)UpBlock2D are supported")
    if [b.startswith("Attn") for b in down] != [b.startswith("Attn") for b in reversed(up)]:
        raise ValueError("UNet2DModel attention on the way up must mirror the way down")
    ch, size = chans[0], int(config["sample_size"])
    if any(c % ch for c in chans) or config.get("in_channels", 3) != config.get("out_channels", 3):
        raise ValueError(f"UNet2DModel block_out_channels {chans} / in != out channels: not our UNet's shape")
    return {
        "ch": ch,
        "ch_mult": [c // ch for c in chans],
        "num_res_blocks": int(config["layers_per_block"]),
        "attn_resolutions": [size // 2**i for i, b in enumerate(down) if b.startswith("Attn")],
        "image_size": size,
        "in_channels": int(config.get("in_channels", 3)),
        "dropout": float(config.get("dropout", 0.1)),  # DDPM CIFAR-10 trained with 0.1 (not in the config)
    }


def read_weights(folder: Path) -> Dict[str, torch.Tensor]:
    st = folder / WEIGHT_FILES[0]
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    return torch.load(folder / WEIGHT_FILES[1], map_location="cpu", weights_only=True)


def _res(src: str, dst: str) -> List[Tuple[str, str]]:
    pairs = [("norm1", "norm1"), ("conv1", "conv1"), ("time_emb_proj", "temb_proj"), ("norm2", "norm2")]
    pairs += [("conv2", "conv2"), ("conv_shortcut", "skip")]
    return [(f"{src}.{a}.{w}", f"{dst}.{b}.{w}") for a, b in pairs for w in ("weight", "bias")]


def _attn(sd: Dict[str, torch.Tensor], src: str, dst: str, out: Dict[str, torch.Tensor]) -> None:
    out[f"{dst}.norm.weight"], out[f"{dst}.norm.bias"] = sd[f"{src}.group_norm.weight"], sd[f"{src}.group_norm.bias"]
    q, k, v = (sd[f"{src}.to_{n}.weight"] for n in "qkv")
    out[f"{dst}.qkv.weight"] = torch.cat([q, k, v])[:, :, None, None]
    out[f"{dst}.qkv.bias"] = torch.cat([sd[f"{src}.to_{n}.bias"] for n in "qkv"])
    out[f"{dst}.proj.weight"] = sd[f"{src}.to_out.0.weight"][:, :, None, None]
    out[f"{dst}.proj.bias"] = sd[f"{src}.to_out.0.bias"]


def convert_state(sd: Dict[str, torch.Tensor], kw: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], set]:
    """A ``UNet2DModel`` state dict -> (ours: same tensors, our names, attention q/k/v stacked; the file's keys
    used)."""
    levels, nrb = len(kw["ch_mult"]), kw["num_res_blocks"]
    out: Dict[str, torch.Tensor] = {}
    pairs = [("conv_in", "conv_in"), ("time_embedding.linear_1", "temb.0"), ("time_embedding.linear_2", "temb.2")]
    pairs += [("conv_norm_out", "norm_out"), ("conv_out", "conv_out")]
    names = [(f"{a}.{w}", f"{b}.{w}") for a, b in pairs for w in ("weight", "bias")]
    attn: List[Tuple[str, str]] = [("mid_block.attentions.0", "mid.1")]
    names += _res("mid_block.resnets.0", "mid.0") + _res("mid_block.resnets.1", "mid.2")
    i = 0
    for lv in range(levels):
        for j in range(nrb):
            names += _res(f"down_blocks.{lv}.resnets.{j}", f"down.{i}.0")
            attn.append((f"down_blocks.{lv}.attentions.{j}", f"down.{i}.1"))
            i += 1
        if lv != levels - 1:
            names += [(f"down_blocks.{lv}.downsamplers.0.conv.{w}", f"down.{i}.conv.{w}") for w in ("weight", "bias")]
            i += 1
    i = 0
    for lv in range(levels):  # diffusers' up_blocks[0] is the lowest resolution, as our first up level
        for j in range(nrb + 1):
            names += _res(f"up_blocks.{lv}.resnets.{j}", f"up.{i}.0")
            attn.append((f"up_blocks.{lv}.attentions.{j}", f"up.{i}.1"))
            i += 1
        if lv != levels - 1:
            names += [(f"up_blocks.{lv}.upsamplers.0.conv.{w}", f"up.{i}.conv.{w}") for w in ("weight", "bias")]
            i += 1
    used = set()
    for a, b in names:
        if a in sd:
            out[b] = sd[a]
            used.add(a)
    for a, b in attn:
        if f"{a}.to_q.weight" in sd:
            _attn(sd, a, b, out)
            used |= {k for k in sd if k.startswith(f"{a}.")}
    return out, used


def load_unet2d(path: Any) -> Tuple[UNet, Dict[str, Any]]:
    """(our UNet with the folder's weights, its UNet kwargs); every weight of our UNet must come from the file and
    every tensor of the file must be used."""
    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    kw = unet_kwargs(config)
    sd = read_weights(folder)
    net = UNet(**kw)
    mine, used = convert_state(sd, kw)
    missing, unexpected = net.load_state_dict(mine, strict=False)
    left = sorted(set(sd) - used)
    if missing or unexpected or left:
        raise ValueError(
            f"{folder}: the UNet2DModel weights do not map onto our UNet (ours missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}; file tensors unused {left[:4]})"
        )
    return net, kw


def scheduler_spec(folder: Path) -> Dict[str, Any]:
    """T and the β range of ``scheduler_config.json`` (beside the UNet or one folder up); DDPM's when absent."""
    for p in (folder / "scheduler_config.json", folder.parent / "scheduler_config.json"):
        if p.is_file():
            c = json.loads(p.read_text())
            if c.get("beta_schedule", "linear") != "linear":
                raise ValueError(f"{p}: beta_schedule {c['beta_schedule']!r}; only DDPM's linear schedule is supported")
            return {"T": int(c.get("num_train_timesteps", 1000)), "beta_start": float(c.get("beta_start", 1e-4)),
                    "beta_end": float(c.get("beta_end", 0.02))}  # fmt: skip
    return {"T": 1000, "beta_start": 1e-4, "beta_end": 0.02}
