"""VAE Exact Encode (Tiled): exact encoding of large images and long videos in bounded memory.
How the tiles and time chunks run: nodes/tiling_glue.py and docs/ARCHITECTURE.md."""
from __future__ import annotations

import torch

import comfy.model_management
from comfy_api.latest import io, ui

from .adapter import check_supported, memory_cap_mb
from .inputs import image_to_pixels, stop_inputs, solver_inputs, solver_options, steps_input
from .tiling_glue import TEMPORAL_DEFAULTS, run_tiled, tile_inputs


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
                io.Int.Input("temporal_size", default=TEMPORAL_DEFAULTS["temporal_size"], min=4, max=4096, step=4,
                             tooltip="Video VAEs only: frames per time chunk (a multiple of the VAE's temporal "
                                     "compression). Clips no longer than this are solved whole in time."),
                io.Int.Input("temporal_overlap", default=TEMPORAL_DEFAULTS["temporal_overlap"], min=0, max=4096, step=4,
                             tooltip="Video VAEs only: frames of already-solved past kept in front of each "
                                     "chunk as causal context; more is closer to the unchunked run."),
                steps_input(tooltip="Iterations per tile grid / time chunk; each costs one tiled decoder and "
                                    "one tiled encoder pass."),
                *solver_inputs(),
                *stop_inputs(),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="Same format as VAE Encode (Tiled)'s LATENT."),
                io.String.Output(display_name="summary",
                                 tooltip="PSNR before and after per image (or per time chunk of a video)."),
            ],
        )

    @classmethod
    def execute(cls, pixels, vae, tile_size, overlap, temporal_size, temporal_overlap, steps, method,
                learning_rate=1.0, precision="auto", auto_stop=True, time_budget=0.0,
                memory_limit_mb=0, select="auto", rival="diis", checkpoint="auto") -> io.NodeOutput:
        check_supported(vae)
        options = solver_options(cls, method, steps, learning_rate, precision, auto_stop=auto_stop,
                                 time_budget=time_budget, memory_limit_mb=memory_cap_mb(vae, memory_limit_mb),
                                 select=select, rival=rival, checkpoint=checkpoint)
        x = image_to_pixels(pixels, vae)
        result = run_tiled(vae, x, options, precision, tile_size, overlap, temporal_size, temporal_overlap)
        samples = result.latent.to(comfy.model_management.intermediate_device(), torch.float32)
        summary = result.summary()
        return io.NodeOutput({"samples": samples}, summary, ui=ui.PreviewText(summary))
