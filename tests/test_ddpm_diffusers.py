"""Published DDPM weights in diffusers' UNet2DModel layout load into our UNet and predict the same ε."""

import json

import pytest
import torch

from uedist.diffusion.diffusers_io import is_unet2d_folder, load_unet2d, unet_kwargs
from uedist.engine.train.ddpm import load_ddpm

diffusers = pytest.importorskip("diffusers")

# config.json of google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 model as diffusers publishes it)
DDPM_CIFAR10 = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A UNet2DModel built from the published config with random weights, saved as diffusers saves it."""
    cfg = {k: v for k, v in DDPM_CIFAR10.items() if not k.startswith("_")}
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**cfg).eval()
    folder = tmp_path_factory.mktemp("ddpm-cifar10-32")
    ref.save_pretrained(folder)
    (folder / "scheduler_config.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMScheduler",
                "beta_schedule": "linear",
                "beta_start": 0.0001,
                "beta_end": 0.02,
                "num_train_timesteps": 1000,
            }
        )  # fmt: skip
    )
    return ref, folder


@pytest.mark.slow
def test_published_layout_loads_and_predicts_the_same_noise(published):
    ref, folder = published
    assert is_unet2d_folder(folder)
    net, kw = load_unet2d(folder)
    net.eval()
    assert (kw["ch"], kw["ch_mult"], kw["num_res_blocks"], kw["attn_resolutions"]) == (128, [1, 2, 2, 2], 2, [16])
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ref.parameters()) == 35_746_307
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for t in (0, 9, 250, 999):
        tt = torch.full((2,), t)
        with torch.no_grad():
            a, b = ref(x, tt).sample, net(x, tt)
        assert (a - b).abs().max() < 1e-4 * max(1.0, a.abs().max().item()), t
    ddpm, cfg = load_ddpm(str(folder), torch.device("cpu"))  # what ddpm=<folder> in a JCDP / DDPM config does
    assert (cfg.diffusion.T, cfg.diffusion.beta_start, cfg.diffusion.beta_end) == (1000, 1e-4, 0.02)
    with torch.no_grad():
        assert torch.allclose(ddpm(x, torch.full((2,), 500)), net(x, torch.full((2,), 500)))


@pytest.mark.parametrize(
    "key, value", [("flip_sin_to_cos", True), ("attention_head_dim", 8), ("act_fn", "gelu"), ("norm_eps", 1e-5)]
)
def test_options_our_unet_lacks_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        unet_kwargs({**DDPM_CIFAR10, key: value})
