"""TAEF2 (tiny autoencoder for FLUX.2 latents) as a real `comfy.sd.VAE`, for tests only.

ComfyUI 0.3.75 has no GN block in its TAESD class, so it cannot build TAEF2. The network below
follows the architecture notes next to the weights (models/taef2/README in the shared data);
`load_taef2_vae` wraps it in a genuine `comfy.sd.VAE` whose first_stage_model is this network.
The torch part imports no ComfyUI.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block; with `gn=True` it first adds a GroupNorm'd 1x1 bottleneck ("GN block")."""

    def __init__(self, n: int, gn: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv(n, n), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))
        self.pool = nn.Sequential(nn.Conv2d(n, 4 * n, 1, bias=False), nn.GroupNorm(4, 4 * n), nn.ReLU(),
                                  nn.Conv2d(4 * n, n, 1, bias=False)) if gn else None
        self.fuse = nn.ReLU()

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def taef2_encoder(latent_channels: int = 32) -> nn.Sequential:
    def down():
        return conv(64, 64, stride=2, bias=False)
    return nn.Sequential(
        conv(3, 64), Block(64), down(), Block(64), Block(64), Block(64), down(),
        Block(64), Block(64), Block(64), down(), Block(64, True), Block(64, True), Block(64, True),
        conv(64, latent_channels))


def taef2_decoder(latent_channels: int = 32) -> nn.Sequential:
    def up():
        return (nn.Upsample(scale_factor=2), conv(64, 64, bias=False))
    return nn.Sequential(
        Clamp(), conv(latent_channels, 64), nn.ReLU(), Block(64, True), Block(64, True), Block(64, True),
        *up(), Block(64), Block(64), Block(64), *up(), Block(64), Block(64), Block(64), *up(), Block(64),
        conv(64, 3))


class TAEF2(nn.Module):
    """encode/decode with ComfyUI's TAESD conventions: pixels in [-1, 1] on both sides."""

    def __init__(self, latent_channels: int = 32):
        super().__init__()
        self.taesd_encoder = taef2_encoder(latent_channels)
        self.taesd_decoder = taef2_decoder(latent_channels)

    def encode(self, x):
        return self.taesd_encoder(x * 0.5 + 0.5)

    def decode(self, z):
        return self.taesd_decoder(z).mul(2).sub(1)


def load_taef2(folder: Path) -> TAEF2:
    from safetensors.torch import load_file

    model = TAEF2()
    model.taesd_encoder.load_state_dict(load_file(str(folder / "taef2_encoder.safetensors")))
    model.taesd_decoder.load_state_dict(load_file(str(folder / "taef2_decoder.safetensors")))
    return model.float().eval()


def load_taef2_vae(folder: Path):
    """A real comfy.sd.VAE (TAESD route, so all of VAE's bookkeeping is ComfyUI's own) whose
    first_stage_model and patcher are swapped for the TAEF2 network."""
    import comfy.model_patcher
    import comfy.sd

    import logging

    stub = {"taesd_decoder.1.weight": torch.zeros(64, 32, 3, 3)}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the stub is replaced below: its "Missing VAE keys" warning is noise
    try:
        vae = comfy.sd.VAE(sd=stub)
    finally:
        root.setLevel(level)
    model = load_taef2(folder).to(vae.vae_dtype)
    vae.first_stage_model = model
    vae.patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=vae.device, offload_device=vae.patcher.offload_device)
    vae.size = None
    vae.model_size()
    return vae
