"""VAE Exact Encode (Tiled): exact encoding of large images and long videos in bounded memory.

Spatial tiles follow stock VAE Encode (Tiled): `tile_size` and `overlap` in pixels. The solver
runs one global iteration whose encoder and decoder passes go tile by tile (core/tiling.py
explains why that beats inverting tiles separately), so the VAE never sees more than one tile.
Video VAEs that are causal in time with the first frame on its own (Wan 2.1 / 2.2) are also
solved in chunks of `temporal_size` frames with `temporal_overlap` frames of frozen, already
solved context in front (core/temporal.py); other video VAEs are solved whole in time.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io, ui

from ..core import InversionOptions, invert
from ..core.temporal import invert_chunked
from ..core.tiling import check_tiling, tiled_codec
from .adapter import check_supported, is_video, latent_cell, temporal_factor, vae_codec
from .exact_encode import image_to_pixels, solver_inputs, solver_options

# Stock VAE Encode's own fallback sizes when it runs out of memory (comfy/sd.py VAE.encode).
FALLBACK = {2: dict(tile_size=512, overlap=64), 3: dict(tile_size=256, overlap=64)}


def tile_inputs(tile_tooltip: str, overlap_tooltip: str) -> list:
    """tile_size / overlap inputs, shared with VAE Decode (Exact Tiled): same defaults and limits."""
    return [io.Int.Input("tile_size", default=512, min=64, max=4096, step=64, tooltip=tile_tooltip),
            io.Int.Input("overlap", default=64, min=0, max=4096, step=32, tooltip=overlap_tooltip)]


def temporally_chunkable(vae) -> bool:
    """Video VAEs whose encoder and decoder are causal with the first frame alone, so that a chunk
    with the solved past in front reproduces the whole-video residual (checked by the tests)."""
    import comfy.ldm.wan.vae
    import comfy.ldm.wan.vae2_2

    return isinstance(vae.first_stage_model, (comfy.ldm.wan.vae.WanVAE, comfy.ldm.wan.vae2_2.WanVAE))


def min_tile(vae) -> int:
    """Smallest spatial tile accepted: 4 latent cells and never below stock's 64 px. A tile any
    smaller is mostly border, where the decoder's receptive field reaches into zero padding.
    A validity floor, not where tiles match the whole decode: measured on TAEF2 (bench/tile_floor.py,
    4 photos), a tile's interior is within 40 dB of the whole decode from 160 px on when only the
    receptive field differs (64 px: 31-33 dB), and its per-tile GroupNorm keeps it at 28-40 dB up to
    192 px. The tiled result is exact for the tiled decoder at any accepted size (VAE Decode (Exact
    Tiled)); the measurement gives no VAE-independent floor, so the rule is unchanged."""
    return max(64, 4 * latent_cell(vae))


def temporal_plan(vae, frames: int, temporal_size: int, temporal_overlap: int) -> tuple[int, int] | None:
    """(chunk, context) in latent frames, or None when the clip is solved whole in time."""
    factor = temporal_factor(vae)
    if factor is None or temporal_size >= frames:
        return None
    name = type(vae.first_stage_model).__name__
    if not temporally_chunkable(vae):
        raise ValueError(
            f"temporal_size: {temporal_size} frames would split this {frames}-frame clip, but {name} is not "
            f"causal frame by frame, so it cannot be solved in time chunks; set temporal_size >= {frames} "
            "(spatial tiles still bound its memory).")
    if temporal_size < factor or temporal_size % factor:
        raise ValueError(f"temporal_size: {temporal_size} frames must be a positive multiple of this VAE's "
                         f"temporal compression ({factor} frames per latent frame).")
    if temporal_overlap < 0 or temporal_overlap % factor:
        raise ValueError(f"temporal_overlap: {temporal_overlap} frames must be >= 0 and a multiple of "
                         f"{factor} (this VAE's frames per latent frame).")
    return temporal_size // factor, temporal_overlap // factor


def run_tiled(vae, x: torch.Tensor, options: InversionOptions, precision: str, tile_size: int, overlap: int,
              temporal_size: int = 64, temporal_overlap: int = 8):
    """Invert `x` (the model's input layout: (B, 3, H, W) or (1, 3, T, H, W), already cropped) with
    spatial tiles and, for causal video VAEs, time chunks. Returns an object with .latent/.summary()."""
    cell = latent_cell(vae)
    tile, ov = check_tiling(tile_size, overlap, cell, min_tile(vae))
    plan = temporal_plan(vae, x.shape[2], temporal_size, temporal_overlap) if x.ndim == 5 and is_video(vae) else None
    h, w = x.shape[-2] // cell, x.shape[-1] // cell
    # ComfyUI's memory estimate for one tile (and one time chunk), not for the whole input
    probe = list(x.shape)
    probe[-2], probe[-1] = min(x.shape[-2], tile_size), min(x.shape[-1], tile_size)
    if plan is not None:
        probe[2] = 1 + temporal_factor(vae) * (plan[0] + plan[1])
    codec = tiled_codec(vae_codec(vae, precision, tuple(probe)), (h, w), cell, tile, ov)
    chunks = 1 if plan is None else -(-((x.shape[2] - 1) // temporal_factor(vae) + 1) // plan[0])
    progress = comfy.utils.ProgressBar(options.steps * chunks)
    done = [0]

    def on_iteration(k, total, info):
        comfy.model_management.throw_exception_if_processing_interrupted()
        progress.update_absolute(done[0] * options.steps + k, options.steps * chunks)

    def on_chunk(i, n):
        done[0] = i

    if plan is None:
        return invert(codec, x, options, callback=on_iteration)
    return invert_chunked(codec, x, options, factor=temporal_factor(vae), chunk=plan[0], context=plan[1],
                          callback=on_iteration, on_chunk=on_chunk)


def oom_fallback(vae, x: torch.Tensor, options: InversionOptions, precision: str):
    """What VAE Exact Encode does after running out of memory: stock VAE Encode's fallback tiles."""
    size = FALLBACK[3 if x.ndim == 5 else 2]
    logging.warning("VAE Exact Encode ran out of memory; retrying tiled (tile %d px, overlap %d px).",
                    size["tile_size"], size["overlap"])
    return run_tiled(vae, x, options, precision, size["tile_size"], size["overlap"])


class VAEExactEncodeTiled(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEExactEncodeTiled",
            display_name="VAE Exact Encode (Tiled)",
            category="latent/inversion",
            description=(
                "VAE Exact Encode for large images and long videos in bounded memory: the same gradient-free "
                "inversion, with every encoder and decoder pass run tile by tile (tile_size / overlap, as in "
                "VAE Encode (Tiled)) so the VAE only ever sees one tile. Causal video VAEs (Wan 2.1/2.2) are "
                "also solved in chunks of temporal_size frames, each with temporal_overlap frames of the "
                "already-solved past in front. The result is exact for the tiled decoder: decode it with VAE "
                "Decode (Exact Tiled) and the same tile_size / overlap (VAEs with GroupNorm, such as TAEF2, "
                "decode tiles differently from the whole image)."),
            inputs=[
                io.Image.Input("pixels", tooltip="The image batch, or the frames of one video for a video VAE."),
                io.Vae.Input("vae", tooltip="The VAE whose decoder is inverted: image VAEs and RGB video VAEs."),
                *tile_inputs("Tile side in pixels (a multiple of the VAE's latent cell, at least 4 cells "
                             "and 64 px). Memory of the VAE passes grows with tile_size squared.",
                             "Pixels shared by neighbouring tiles, blended with a linear ramp "
                             "(a multiple of the latent cell, smaller than tile_size)."),
                io.Int.Input("temporal_size", default=64, min=4, max=4096, step=4,
                             tooltip="Video VAEs only: frames per time chunk (a multiple of the VAE's temporal "
                                     "compression). Clips no longer than this are solved whole in time."),
                io.Int.Input("temporal_overlap", default=8, min=0, max=4096, step=4,
                             tooltip="Video VAEs only: frames of already-solved past kept in front of each "
                                     "chunk as causal context; more is closer to the unchunked run."),
                io.Int.Input("steps", default=100, min=1, max=10000,
                             tooltip="Iterations per tile grid / time chunk; each costs one tiled decoder and "
                                     "one tiled encoder pass."),
                *solver_inputs(),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="Same format as VAE Encode (Tiled)'s LATENT."),
                io.String.Output(display_name="summary",
                                 tooltip="PSNR before and after per image (or per time chunk of a video)."),
            ],
        )

    @classmethod
    def execute(cls, pixels, vae, tile_size, overlap, temporal_size, temporal_overlap, steps, method,
                learning_rate=1.0, precision="auto") -> io.NodeOutput:
        check_supported(vae)
        options = solver_options("VAE Exact Encode (Tiled)", method, steps, learning_rate, precision)
        x = image_to_pixels(pixels, vae)
        result = run_tiled(vae, x, options, precision, tile_size, overlap, temporal_size, temporal_overlap)
        samples = result.latent.to(comfy.model_management.intermediate_device(), torch.float32)
        summary = result.summary()
        return io.NodeOutput({"samples": samples}, summary, ui=ui.PreviewText(summary))
