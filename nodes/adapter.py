"""Turns a ComfyUI `VAE` into the `Codec` the solver inverts, on the VAE's own device.

The stock `vae.encode/decode` move every result to the output device and clamp on each call;
inside a 100-iteration loop that is 200 host-device round trips. This adapter loads the model
once with ComfyUI's memory manager and then calls `first_stage_model.encode/decode` directly,
with ComfyUI's `process_input/process_output`, so every tensor of the loop stays on the device.
"""
from __future__ import annotations

import copy

import torch

import comfy.model_management

from ..core import Codec

PRECISIONS = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UnsupportedVAE(ValueError):
    pass


def check_supported(vae) -> None:
    """Raise with the reason and the alternative when this VAE cannot be inverted here."""
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise UnsupportedVAE("vae: this VAE is empty (the checkpoint holds no VAE weights). "
                             "Load a VAE file with 'Load VAE' and connect it instead.")
    kind = type(vae.first_stage_model).__name__
    if getattr(vae, "latent_dim", 2) != 2:
        raise UnsupportedVAE(
            f"vae: {kind} has {vae.latent_dim}-D latents (a video or audio VAE). VAE Exact Encode "
            "handles 2-D image VAEs for now; use the stock 'VAE Encode' for this one.")
    if getattr(vae, "extra_1d_channel", None) is not None or getattr(vae, "output_channels", 3) != 3:
        raise UnsupportedVAE(f"vae: {kind} does not decode to RGB images, so its decoder cannot be "
                             "inverted against an image; use the stock 'VAE Encode'.")


def latent_cell(vae) -> int:
    """Pixels per latent cell along each side (8 for SD/FLUX VAEs)."""
    return int(vae.spacial_compression_encode())


def vae_codec(vae, precision: str = "auto", image_shape: tuple | None = None) -> Codec:
    """Codec for `vae` computing in `precision` (auto = the dtype ComfyUI chose for this VAE).

    A precision other than the VAE's own runs on a cast copy of the model, so the shared VAE
    that other nodes use is never modified.
    """
    check_supported(vae)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    dtype = PRECISIONS[precision] or vae.vae_dtype
    memory = 0
    if image_shape is not None:  # (B, 3, H, W): ComfyUI's own estimates, encode + decode
        cell = latent_cell(vae)
        latent_shape = (image_shape[0], vae.latent_channels, image_shape[2] // cell, image_shape[3] // cell)
        memory = vae.memory_used_encode(image_shape, dtype) + vae.memory_used_decode(latent_shape, dtype)
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=memory,
                                           force_full_load=vae.disable_offload)
    model = vae.first_stage_model
    if dtype != vae.vae_dtype:
        model = copy.deepcopy(model).to(dtype)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        try:
            return model.encode(vae.process_input(pixels).to(dtype))
        except NotImplementedError as e:  # decoder-only tiny autoencoders
            raise UnsupportedVAE(f"vae: this VAE cannot encode ({e}); exact encoding needs an encoder.") from e

    def decode(latent: torch.Tensor) -> torch.Tensor:
        return vae.process_output(model.decode(latent.to(dtype)))

    def grad_decode():
        # The gradient baseline needs weights that are ordinary tensors: a model built while
        # ComfyUI ran a loader node under inference_mode holds inference tensors, which
        # autograd refuses. A private fp32 copy also keeps the shared VAE untouched.
        with torch.inference_mode(False):
            model32 = copy.deepcopy(vae.first_stage_model).float().requires_grad_(False)
        return lambda z: vae.process_output(model32.decode(z))

    return Codec(encode=encode, decode=decode, dtype=dtype, device=vae.device, grad_decode=grad_decode)
