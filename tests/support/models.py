"""Real `comfy.sd.VAE` objects for the tests: shared pretrained weights and seeded random
full-size architectures (random weights: shapes, dtypes and plumbing only, never quality)."""
from __future__ import annotations

import json

import torch

from .paths import require
from .taef2 import load_taef2_vae


def taef2_vae():
    return load_taef2_vae(require("models/taef2"))


def kl_f8_small_vae():
    import comfy.sd
    from safetensors.torch import load_file

    folder = require("models/kl_f8_small")
    config = json.loads((folder / "config.json").read_text())
    return comfy.sd.VAE(sd=load_file(str(folder / "kl_f8_small.safetensors")), config=config)


def _random_kl_state_dict(z_channels: int, seed: int) -> dict:
    """A full-size KL-f8 VAE (ComfyUI's SD/SDXL/SD3/FLUX.1 layout) with seeded random weights,
    built with ComfyUI's own class and then read back as a state dict, so ComfyUI's detection
    sees exactly the keys a real checkpoint has."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": z_channels, "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                "attn_resolutions": [], "dropout": 0.0}
    model = AutoencoderKL(ddconfig=ddconfig, embed_dim=z_channels)
    # ComfyUI's layers skip weight init (they expect a checkpoint): fill every tensor ourselves,
    # fan-in scaled so activations stay finite through the full-depth network.
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if v.ndim > 1:
            sd[k] = torch.randn(v.shape, generator=g) / (v[0].numel() ** 0.5)
        else:
            is_norm_scale = "norm" in k and k.endswith("weight")
            sd[k] = torch.ones(v.shape) if is_norm_scale else torch.zeros(v.shape)
    if z_channels == 16:  # SD3 / FLUX.1 VAEs have no quant convs
        sd = {k: v for k, v in sd.items() if "quant_conv" not in k}
    return sd


def random_sd_vae(seed: int = 0):
    """SD1/SD2/SDXL-shaped 4-channel VAE detected from its keys, like a checkpoint's."""
    import comfy.sd

    return comfy.sd.VAE(sd=_random_kl_state_dict(4, seed))


def random_flux_vae(seed: int = 0):
    """SD3/FLUX.1-shaped 16-channel VAE detected from its keys."""
    import comfy.sd

    return comfy.sd.VAE(sd=_random_kl_state_dict(16, seed))
