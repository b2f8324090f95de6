"""Real `comfy.sd.VAE` objects for the tests: shared pretrained weights and seeded random
full-size architectures (random weights: shapes, dtypes and plumbing only, never quality)."""
from __future__ import annotations

import json
from pathlib import Path

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


def seeded_weights(template: dict, seed: int) -> dict:
    """Seeded random tensors shaped like `template`. ComfyUI's layers skip weight init (they
    expect a checkpoint), so we fill every tensor: fan-in-scaled normals for weights, so
    activations stay finite through full-depth networks; ones for norm scales; zeros elsewhere."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in template.items():
        if v.ndim > 1:
            out[k] = torch.randn(v.shape, generator=g) / (v[0].numel() ** 0.5)
        elif ("norm" in k and k.endswith("weight")) or k == "vae_scale":
            out[k] = torch.ones(v.shape)
        else:
            out[k] = torch.zeros(v.shape)
    return out


def _random_kl_state_dict(z_channels: int, seed: int) -> dict:
    """A full-size KL-f8 VAE (ComfyUI's SD/SDXL/SD3/FLUX.1 layout) with seeded random weights,
    built with ComfyUI's own class and then read back as a state dict, so ComfyUI's detection
    sees exactly the keys a real checkpoint has."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": z_channels, "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                "attn_resolutions": [], "dropout": 0.0}
    sd = seeded_weights(AutoencoderKL(ddconfig=ddconfig, embed_dim=z_channels).state_dict(), seed)
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


def random_taesd_vae(seed: int = 0, latent_channels: int = 4):
    """A TAESD-family tiny autoencoder as ComfyUI detects it from its keys (taesd_encoder/decoder)."""
    import comfy.sd
    from comfy.taesd.taesd import TAESD

    return comfy.sd.VAE(sd=seeded_weights(TAESD(latent_channels=latent_channels).state_dict(), seed))


def random_wan21_vae(seed: int = 0, dim: int = 8):
    """A Wan 2.1 video VAE as ComfyUI detects it from its keys (decoder.middle.0.residual.0.gamma,
    no Wan 2.2 upsample keys), the real architecture with its width inferred by ComfyUI from
    decoder.head.0.gamma: `dim` 8 instead of 96 keeps it small on CPU. Seeded random weights."""
    import comfy.sd
    from comfy.ldm.wan.vae import WanVAE

    model = WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True])
    return comfy.sd.VAE(sd=seeded_weights(model.state_dict(), seed))


def random_taehv_vae(seed: int = 0):
    """A TAEHV-family tiny video autoencoder (lighttaew2_1 layout, 16 channels, fp32 keys) as
    ComfyUI detects it (decoder.22.bias). Seeded random weights."""
    import comfy.sd
    from comfy.taesd.taehv import TAEHV

    return comfy.sd.VAE(sd=seeded_weights(TAEHV(latent_channels=16).state_dict(), seed))


def random_audio_vae():
    """Stable Audio's Oobleck VAE (a 1-D audio VAE), only to check that it is rejected."""
    import comfy.sd
    from comfy.ldm.audio.autoencoder import AudioOobleckVAE

    return comfy.sd.VAE(sd=AudioOobleckVAE().state_dict())


def write_random_taesd_file(models_dir, name: str, seed: int):
    """A seeded random TAESD-family VAE saved as <models_dir>/vae/<name>, which stock Load VAE
    detects by its keys: lets shipped workflows (that name a user's VAE) run on the test server."""
    from safetensors.torch import save_file
    from comfy.taesd.taesd import TAESD

    vae_dir = Path(models_dir) / "vae"
    vae_dir.mkdir(parents=True, exist_ok=True)
    weights = seeded_weights(TAESD(latent_channels=4).state_dict(), seed)
    save_file({k: v.contiguous().to(torch.float32) for k, v in weights.items()}, str(vae_dir / name))
