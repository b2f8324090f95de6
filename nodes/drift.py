"""VAE Round-Trip Drift: N encode -> decode generations with stock VAE Encode vs VAE Exact Encode."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io, ui

from ..core import METHODS, drift, invert
from ..core.methods import METHOD_REGISTRY
from . import plots
from .adapter import check_supported, vae_codec
from .inputs import DEFAULT_METHOD, image_to_pixels, method_input, solver_options, steps_input

STOCK, EXACT = "stock VAE Encode", "VAE Exact Encode"
# Gradient-free methods only: gradient and hybrid backpropagate through the decoder, and a drift
# graph runs one inversion per generation.
DRIFT_METHODS = [m for m in METHODS if METHOD_REGISTRY[m].family == "fixed_point"]


class VAERoundTripDrift(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExactEncodeRoundTripDrift",
            display_name="VAE Round-Trip Drift",
            category="latent/inversion",
            is_output_node=True,
            description=(
                "Shows how repeated editing passes degrade an image: encodes and decodes it `generations` "
                "times in a row, once with the plain encoder (what stock VAE Encode does) and once with "
                "VAE Exact Encode, and plots PSNR against the original per generation."),
            inputs=[
                io.Image.Input("image", tooltip="The original image (alpha is dropped)."),
                io.Vae.Input("vae", tooltip="Any 2-D image VAE."),
                io.Int.Input("generations", default=5, min=1, max=100,
                             tooltip="How many encode -> decode passes in a row (each img2img or inpaint "
                                     "pass is one)."),
                steps_input(tooltip="VAE Exact Encode iterations per generation."),
                method_input(DRIFT_METHODS, tooltip="VAE Exact Encode's method (see that node)."),
            ],
            outputs=[
                io.Image.Output(display_name="stock", tooltip="The last generation with stock VAE Encode."),
                io.Image.Output(display_name="exact", tooltip="The last generation with VAE Exact Encode."),
                io.Image.Output(display_name="side_by_side",
                                tooltip="Per image: original | stock | exact, last generation."),
                io.Image.Output(display_name="plot", tooltip="PSNR vs the original per generation."),
                io.String.Output(display_name="report", tooltip="The PSNR table per generation."),
            ],
        )

    @classmethod
    def execute(cls, image, vae, generations=5, steps=100, method=DEFAULT_METHOD) -> io.NodeOutput:
        check_supported(vae)
        options = solver_options(cls, method, steps, methods=DRIFT_METHODS)
        pixels = image_to_pixels(image, vae, input_name="image")
        codec = vae_codec(vae, "auto", tuple(pixels.shape))
        progress = comfy.utils.ProgressBar(2 * generations * (steps + 2))
        done = [0]

        def tick(*_):
            comfy.model_management.throw_exception_if_processing_interrupted()
            done[0] += 1
            progress.update_absolute(done[0])

        def stock(x):
            out = codec.encode(x).float()
            for _ in range(steps + 1):
                tick()
            return out

        def exact(x):
            return invert(codec, x, options, callback=tick).latent

        result = drift(codec, pixels, {STOCK: stock, EXACT: exact}, generations, callback=tick)
        report = result.report()
        batch = pixels.shape[0]
        series = {n: result.psnr[n][1:].mean(1).tolist()
                  for n in (STOCK, EXACT)}
        title = (f"{generations} encode -> decode generations, {type(vae.first_stage_model).__name__}, "
                 f"{pixels.shape[3]}x{pixels.shape[2]} px" + (f", mean of {batch} images" if batch > 1 else ""))
        plot = plots.drift_plot(title, series, colors={STOCK: "tab:red", EXACT: "tab:blue"})[None]
        device = comfy.model_management.intermediate_device()
        finals = {n: result.finals[n].movedim(1, -1).to(device, torch.float32) for n in (STOCK, EXACT)}
        original = pixels.movedim(1, -1).to(device, torch.float32)
        side = torch.cat([original, finals[STOCK], finals[EXACT]], dim=2)
        return io.NodeOutput(finals[STOCK], finals[EXACT], side, plot, report, ui=ui.PreviewText(report))
