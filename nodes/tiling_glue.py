"""Tiled runs of the solver on a ComfyUI VAE, shared by VAE Exact Encode (its out-of-memory
fallback), VAE Exact Encode (Tiled) and VAE Decode (Exact Tiled) (the tile inputs and rules).

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

from comfy_api.latest import io

from ..core import InversionOptions, invert
from ..core.result import Result
from ..core.temporal import invert_chunked
from ..core.tiling import check_tiling, tiled_codec
from .adapter import is_video, latent_cell, temporal_factor, vae_codec
from .progress import iteration_callback

# Stock VAE Encode's own fallback sizes when it runs out of memory (comfy/sd.py VAE.encode).
FALLBACK = {2: dict(tile_size=512, overlap=64), 3: dict(tile_size=256, overlap=64)}
TEMPORAL_DEFAULTS = dict(temporal_size=64, temporal_overlap=8)  # VAE Exact Encode (Tiled)'s defaults


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
              temporal_size: int = TEMPORAL_DEFAULTS["temporal_size"],
              temporal_overlap: int = TEMPORAL_DEFAULTS["temporal_overlap"]) -> Result:
    """Invert `x` (the model's input layout: (B, 3, H, W) or (1, 3, T, H, W), already cropped) with
    spatial tiles and, for causal video VAEs, time chunks."""
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
    done = [0]
    on_iteration = iteration_callback(options.steps * chunks, offset=lambda: done[0] * options.steps)

    def on_chunk(i, n):
        done[0] = i

    if plan is None:
        return invert(codec, x, options, callback=on_iteration)
    return invert_chunked(codec, x, options, factor=temporal_factor(vae), chunk=plan[0], context=plan[1],
                          callback=on_iteration, on_chunk=on_chunk)


def oom_fallback(vae, x: torch.Tensor, options: InversionOptions, precision: str) -> Result:
    """What VAE Exact Encode does after running out of memory: stock VAE Encode's fallback tiles.
    In time, VAE Exact Encode (Tiled)'s defaults for the causal Wan VAEs; every other video VAE
    is solved whole in time (it cannot be chunked; VAE Exact Encode has no temporal input)."""
    size = FALLBACK[3 if x.ndim == 5 else 2]
    temporal = dict(TEMPORAL_DEFAULTS)
    if x.ndim == 5 and is_video(vae) and not temporally_chunkable(vae):
        temporal["temporal_size"] = x.shape[2]
    logging.warning("VAE Exact Encode ran out of memory; retrying tiled (tile %d px, overlap %d px).",
                    size["tile_size"], size["overlap"])
    return run_tiled(vae, x, options, precision, size["tile_size"], size["overlap"], **temporal)
