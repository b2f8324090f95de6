"""A `Codec` from a diffusers autoencoder: `AutoencoderKL` (SD 1.x/2.x, SDXL, SD3, FLUX.1) or
`AutoencoderTiny` (the TAESD family).

Latent convention: the one diffusers pipelines use, so an exact latent drops into a pipeline's
`latents=` argument unchanged:

    latent = (E_raw(2x - 1) - shift_factor) * scaling_factor        (encode)
    x      = (D_raw(latent / scaling_factor + shift_factor) + 1) / 2  (decode, clamped to [0, 1])

with `scaling_factor` / `shift_factor` from `vae.config` (SD 1.x/2.x 0.18215 / 0, SDXL 0.13025 / 0,
SD3 1.5305 / 0.0609, FLUX.1 0.3611 / 0.1159, TAESD 1.0 / 0: TAESD latents are already scaled).
E_raw is the posterior mode (deterministic), not a sample. FLUX pipelines additionally pack the
(B, 16, h, w) latent into 2x2 patches (`FluxPipeline._pack_latents`); that is the pipeline's
business and not done here. Both factors are linear, so the inversion itself is the same in any
convention (the residual and the step scale together).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..checkpointing import recomputable
from ..codec import Codec

Tensor = torch.Tensor


def latent_factors(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a diffusers VAE, as its pipelines apply them."""
    config = vae.config
    scale = getattr(config, "scaling_factor", None)
    shift = getattr(config, "shift_factor", None)
    return (1.0 if scale is None else float(scale)), (0.0 if shift is None else float(shift))


def _raw_codec(vae):
    """The model's own encode/decode on [-1, 1] pixels and raw latents, for either class."""
    kind = type(vae).__name__
    if kind == "AutoencoderKL":
        return (lambda x: vae.encode(x).latent_dist.mode()), (lambda z: vae.decode(z).sample)
    if kind == "AutoencoderTiny":
        return (lambda x: vae.encode(x).latents), (lambda z: vae.decode(z).sample)
    raise TypeError(f"vae: {kind} is not supported; pass a diffusers AutoencoderKL or AutoencoderTiny "
                    "(video autoencoders are not supported yet).")


def diffusers_codec(vae, dtype: Optional[torch.dtype] = None,
                    scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None) -> Codec:
    """Codec on `vae`'s device; `dtype` other than the model's runs on a cast copy (the caller's
    model is never modified). `scaling_factor` / `shift_factor` override `vae.config`'s.

    Example (a random 1-block AutoencoderKL; real use: `AutoencoderKL.from_pretrained(...)`):
        >>> import torch
        >>> from diffusers import AutoencoderKL
        >>> from exact_encode import invert
        >>> from exact_encode.adapters.diffusers import diffusers_codec
        >>> _ = torch.manual_seed(0)
        >>> vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).eval()
        >>> codec = diffusers_codec(vae)
        >>> invert(codec, torch.rand(1, 3, 8, 8), steps=2).latent.shape
        torch.Size([1, 4, 8, 8])
    """
    param = next(vae.parameters())
    model_dtype, device = param.dtype, param.device
    dtype = dtype or model_dtype
    model = vae if dtype == model_dtype else copy.deepcopy(vae).to(dtype)
    model.eval()
    default_scale, default_shift = latent_factors(vae)
    scale = default_scale if scaling_factor is None else float(scaling_factor)
    shift = default_shift if shift_factor is None else float(shift_factor)

    def wrap(net):
        raw_encode, raw_decode = _raw_codec(net)

        def encode(pixels: Tensor) -> Tensor:
            return (raw_encode(pixels.to(dtype) * 2 - 1) - shift) * scale

        def decode(latent: Tensor) -> Tensor:
            return ((raw_decode(latent.to(dtype) / scale + shift) + 1) / 2).clamp(0, 1)

        return encode, decode

    encode, decode = wrap(model)

    def grad_decode():
        # The gradient baseline needs an fp32 model of ordinary tensors, private to this codec (its blocks may be
        # recomputed in the backward: InversionOptions.checkpoint).
        with torch.inference_mode(False):
            model32 = copy.deepcopy(vae).float().requires_grad_(False)
        raw_decode = _raw_codec(model32)[1]
        return recomputable(lambda z: ((raw_decode(z.float() / scale + shift) + 1) / 2).clamp(0, 1), model32)

    return Codec(encode=encode, decode=decode, dtype=dtype, device=device, grad_decode=grad_decode)
