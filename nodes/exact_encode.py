"""VAE Exact Encode (Gradient-Free): the latent whose decode reproduces the image."""
from __future__ import annotations

from dataclasses import replace

import torch

import comfy.model_management
from comfy_api.latest import io, ui

from ..core import invert
from . import trace
from .adapter import check_supported, is_oom, latent_cell, memory_cap_mb, vae_codec
from .inputs import image_to_pixels, record_every, solver_inputs, solver_options, steps_input, stop_inputs
from .progress import iteration_callback, progress_sender
from .tiling_glue import oom_fallback


class VAEExactEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEExactEncode",
            display_name="VAE Exact Encode (Gradient-Free)",
            category="latent/inversion",
            description=(
                "Encodes an image to the latent whose decode reproduces it, instead of trusting the "
                "encoder: iterates z <- z - lr * (E(D(z)) - E(x)) from z = E(x) with no backprop "
                "(Hong et al., NeurIPS 2024) and returns the iterate whose decode is closest to the image "
                "(or, where that one drifts in the latent, the one a twin problem picks: see select), "
                "never worse than plain VAE Encode. Same LATENT format as VAE Encode."),
            inputs=[
                io.Image.Input("pixels", tooltip="The image to encode (alpha is dropped, as VAE Encode does)."),
                io.Vae.Input("vae", tooltip="The VAE whose decoder is inverted: any image VAE, or a video VAE that "
                                            "decodes RGB frames (the batch is one clip, as in VAE Encode)."),
                steps_input(),
                *solver_inputs(),
                io.Float.Input("tolerance", default=0.0, min=0.0, max=1.0, step=0.0001, optional=True,
                               tooltip="(advanced) Stop an image early once ||E(D(z)) - E(x)|| / ||E(x)|| "
                                       "falls to this value. 0 = off (auto_stop still applies)."),
                io.Boolean.Input("check_assumption", default=True, optional=True,
                                 tooltip="(advanced) Keep the iterates (host memory, at most 256 MB) to test "
                                         "the paper's convergence assumption (cocoercivity) along the run; "
                                         "Inversion Diagnostics reports it. Off saves that memory."),
                *stop_inputs(),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="Drop-in replacement for VAE Encode's LATENT."),
                io.String.Output(display_name="summary",
                                 tooltip="Per image: PSNR of the decode before and after, the gain, the "
                                         "residual and why the solver stopped."),
            ],
        )

    @classmethod
    def execute(cls, pixels, vae, steps, method, learning_rate=1.0, precision="auto",
                tolerance=0.0, check_assumption=True, auto_stop=True, time_budget=0.0,
                memory_limit_mb=0, select="auto", rival="diis", checkpoint="auto") -> io.NodeOutput:
        check_supported(vae)
        options = solver_options(cls, method, steps, learning_rate, precision, auto_stop=auto_stop, tolerance=tolerance,
                                 time_budget=time_budget, memory_limit_mb=memory_cap_mb(vae, memory_limit_mb),
                                 select=select, rival=rival, checkpoint=checkpoint)
        image = image_to_pixels(pixels, vae)
        if check_assumption:
            # upper bound (video VAEs also compress time): only sizes the assumption check's budget
            latent_numel = image.numel() // 3 // latent_cell(vae) ** 2 * vae.latent_channels
            options = replace(options, record_every=record_every(steps, latent_numel, options.residual_stride))
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        on_iteration = iteration_callback(steps, send=progress_sender(node_id))

        result = None
        try:
            result = invert(vae_codec(vae, precision, tuple(image.shape)), image, options, callback=on_iteration)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is caught, the rest re-raised
            if not is_oom(e):
                raise
            # like stock VAE Encode: leave the except block first so the failed run's memory is freed
        if result is None:
            result = oom_fallback(vae, image, options, precision)
        samples = result.latent.to(comfy.model_management.intermediate_device(), torch.float32)
        trace.attach(samples, result, image)  # for Inversion Diagnostics; invisible to every other node
        summary = result.summary()
        # ui.text reaches the browser in the "executed" message: web/ shows it on the node.
        return io.NodeOutput({"samples": samples}, summary, ui=ui.PreviewText(summary))
