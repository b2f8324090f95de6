"""VAE Decode (Exact Tiled): the decoder that VAE Exact Encode (Tiled) inverted.

VAE Exact Encode (Tiled) returns the latent whose *tiled* decode -- on its tile grid, with its
linear feathering (core/tiling.py) -- reproduces the image. Stock VAE Decode (Tiled) decodes on
other grids: for images it averages three passes with tiles of t/2 x 2t, 2t x t/2 and t x t
latent cells (comfy/sd.py VAE.decode_tiled_), for video one pass of comfy.utils.tiled_scale_multidim
with its own tile placement and feathering, also tiled in time. Where a VAE decodes a tile
differently from the whole image (GroupNorm blocks, e.g. TAEF2), only the same grid gives back
what was inverted. This node decodes with exactly `core.tiling.tiled_codec` for the same tile_size
and overlap. Video latents are decoded whole in time, as the encoder's decoder pass saw them: for
the causal Wan VAEs a time chunk solved with its whole past in front is exact for this decode.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..core.codec import Codec
from ..core.tiling import TileGrid, check_tiling, tiled_codec
from .adapter import PRECISIONS, check_supported, is_video, latent_cell, vae_codec
from .inputs import check_choice, check_finite, precision_input
from .tiling_glue import min_tile, tile_inputs


def check_latent(samples, vae) -> torch.Tensor:
    """The LATENT's samples, or an error naming `samples` when they do not belong to this VAE."""
    z = samples.get("samples") if isinstance(samples, dict) else None
    ndim = 5 if getattr(vae, "latent_dim", 2) == 3 else 4
    name = type(vae.first_stage_model).__name__
    if not isinstance(z, torch.Tensor) or z.ndim != ndim or z.shape[1] != vae.latent_channels or z.shape[0] == 0:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"samples: got a latent of shape {shape}, but this VAE ({name}) decodes {ndim}-D latents "
                         f"with {vae.latent_channels} channels; connect a LATENT made by this VAE.")
    return check_finite(z, "samples")  # as the pack's other nodes: no silently all-NaN image


def pixel_shape(vae, z: torch.Tensor, tile_px: int) -> tuple:
    """Model input shape of one tile (ComfyUI's memory estimates take it)."""
    cell = latent_cell(vae)
    h, w = min(z.shape[-2] * cell, tile_px), min(z.shape[-1] * cell, tile_px)
    if z.ndim == 5:
        frames = int(vae.upscale_ratio[0](z.shape[2])) if is_video(vae) else z.shape[2]
        return (z.shape[0], 3, frames, h, w)
    return (z.shape[0], 3, h, w)


def exact_tiled_decoder(vae, z: torch.Tensor, tile_size: int, overlap: int, precision: str = "auto"):
    """The tiled decode VAE Exact Encode (Tiled) inverts, for a latent `z`; validation as there."""
    cell = latent_cell(vae)
    tile, ov = check_tiling(tile_size, overlap, cell, min_tile(vae))
    codec = vae_codec(vae, precision, pixel_shape(vae, z, tile_size))
    tiles = len(TileGrid(z.shape[-2], z.shape[-1], tile, ov, cell))
    progress = comfy.utils.ProgressBar(tiles)

    def decode(t):
        comfy.model_management.throw_exception_if_processing_interrupted()
        out = codec.decode(t)
        progress.update(1)
        return out

    counted = Codec(encode=codec.encode, decode=decode, dtype=codec.dtype, device=codec.device)
    return tiled_codec(counted, (z.shape[-2], z.shape[-1]), cell, tile, ov).decode, codec


class VAEDecodeExactTiled(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEDecodeExactTiled",
            display_name="VAE Decode (Exact Tiled)",
            category="latent/inversion",
            description=(
                "Decodes a latent tile by tile on exactly the grid and blending that VAE Exact Encode (Tiled) "
                "inverted (same tile_size and overlap), so a tiled exact encode round-trips exactly. Stock VAE "
                "Decode (Tiled) averages several passes with other tile shapes, which differs for VAEs whose "
                "tiles decode differently from the whole image (GroupNorm). Video latents: tiled in space, "
                "whole in time."),
            inputs=[
                io.Latent.Input("samples", tooltip="The LATENT from VAE Exact Encode (Tiled) "
                                                   "(or any latent of this VAE)."),
                io.Vae.Input("vae", tooltip="The VAE the latent belongs to."),
                *tile_inputs("Tile side in pixels: the value VAE Exact Encode (Tiled) used.",
                             "Pixels shared by neighbouring tiles: the value VAE Exact Encode (Tiled) used."),
                precision_input(tooltip="(advanced) Dtype of the decoder: the precision the encode used."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="Same format as VAE Decode's IMAGE.")],
        )

    @classmethod
    def execute(cls, samples, vae, tile_size, overlap, precision="auto") -> io.NodeOutput:
        check_supported(vae)
        check_choice("precision", precision, PRECISIONS)
        z = check_latent(samples, vae)
        decode, codec = exact_tiled_decoder(vae, z, tile_size, overlap, precision)
        with torch.inference_mode():
            x = decode(z.to(codec.device, codec.dtype))
        images = x.to(comfy.model_management.intermediate_device(), torch.float32).movedim(1, -1)
        if images.ndim == 5:  # video (1, T, H, W, 3) or 3-D image VAEs (B, 1, H, W, 3): frames, as VAE Decode
            images = images.reshape(-1, *images.shape[-3:])
        return io.NodeOutput(images)
