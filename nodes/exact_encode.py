"""VAE Exact Encode (Gradient-Free): the latent whose decode reproduces the image."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io, ui

from ..core import METHODS, InversionOptions, invert
from .adapter import PRECISIONS, latent_cell, vae_codec, check_supported, to_vae_layout


def image_to_pixels(image: torch.Tensor, vae) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> (B, 3, H, W), cropped like stock VAEEncode, or a clear error."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(f"pixels: expected an IMAGE batch (B, H, W, C); got {getattr(image, 'shape', type(image))}")
    if image.shape[0] == 0:
        raise ValueError("pixels: the batch is empty; connect a node that outputs at least one image.")
    channels = image.shape[-1]
    if channels == 4:
        image = image[..., :3]  # drop alpha, as stock VAE Encode does
    elif channels != 3:
        raise ValueError(f"pixels: has {channels} channel(s); VAE Exact Encode needs RGB. Convert it first "
                         "(for a mask or grey image, 'Convert Mask to Image' gives RGB).")
    cell = latent_cell(vae)
    if image.shape[1] < cell or image.shape[2] < cell:
        raise ValueError(f"pixels: {image.shape[2]}x{image.shape[1]} px is smaller than one latent cell of this "
                         f"VAE ({cell}x{cell} px); upscale or pad it to at least {cell} px per side.")
    if not torch.isfinite(image).all():
        raise ValueError("pixels: contains NaN or Inf pixels; fix the node that produced it.")
    return to_vae_layout(vae.vae_encode_crop_pixels(image), vae)  # video VAEs: the batch is one clip


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
                "(Hong et al., NeurIPS 2024) and returns the iterate whose decode is closest to the image, "
                "never worse than plain VAE Encode. Same LATENT format as VAE Encode."),
            inputs=[
                io.Image.Input("pixels", tooltip="The image to encode (alpha is dropped, as VAE Encode does)."),
                io.Vae.Input("vae", tooltip="The VAE whose decoder is inverted: any image VAE, or a video VAE that decodes RGB frames (the batch is one clip, as in VAE Encode)."),
                io.Int.Input("steps", default=100, min=1, max=10000,
                             tooltip="Iterations; each costs one decoder and one encoder pass. "
                                     "100 follows the paper; the best iterate is returned."),
                io.Combo.Input("method", options=list(METHODS), default="adam",
                               tooltip="adam: the paper's method (Adam moments on the residual, warm-up + "
                                       "cosine schedule). forward: plain fixed-point step. km: inertial "
                                       "Krasnoselskii-Mann (forward step with momentum). anderson: safeguarded "
                                       "Anderson acceleration of the forward step. gradient: baseline "
                                       "that backpropagates through the decoder (slower, far more memory)."),
                io.Float.Input("learning_rate", default=1.0, min=0.0001, max=100.0, step=0.01, optional=True,
                               tooltip="(advanced) Multiplier on the method's tuned step: 1.0 = lr 0.01 x "
                                       "RMS of the latent for adam/gradient (the paper's 0.01 on SD-scaled "
                                       "latents, for any VAE), step 0.5 for forward/km/anderson."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto", optional=True,
                               tooltip="(advanced) Dtype of the encoder/decoder passes; optimizer state stays "
                                       "fp32. auto = the VAE's own dtype. fp16/bf16 halve memory and are "
                                       "faster on GPUs; other than auto, a cast copy of the VAE is used."),
                io.Float.Input("tolerance", default=0.0, min=0.0, max=1.0, step=0.0001, optional=True,
                               tooltip="(advanced) Stop an image early once ||E(D(z)) - E(x)|| / ||E(x)|| "
                                       "falls to this value. 0 runs all steps."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="Drop-in replacement for VAE Encode's LATENT."),
                io.String.Output(display_name="summary",
                                 tooltip="Per image: PSNR of the decode before and after, the gain, the "
                                         "residual and why the solver stopped."),
            ],
        )

    @classmethod
    def execute(cls, pixels, vae, steps, method, learning_rate=1.0, precision="auto",
                tolerance=0.0) -> io.NodeOutput:
        check_supported(vae)
        # V3 combos are not checked against their options by the 0.3.75 validator: do it here.
        if method not in METHODS:
            raise ValueError(f"method: must be one of {', '.join(METHODS)}; got {method!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0 (1.0 is the method's default); got {learning_rate}")
        options = InversionOptions(method=method, steps=steps, tolerance=tolerance,
                                   lr=learning_rate * InversionOptions(method=method).step_size)
        try:
            options.validate()
        except ValueError as e:
            raise ValueError(f"VAE Exact Encode: {e}") from None
        image = image_to_pixels(pixels, vae)
        progress = comfy.utils.ProgressBar(steps)

        def on_iteration(k, total, info):
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(k, total)

        result = None
        try:
            result = invert(vae_codec(vae, precision, tuple(image.shape)), image, options, callback=on_iteration)
        except comfy.model_management.OOM_EXCEPTION:
            pass  # like stock VAE Encode: leave the except block first so the failed run's memory is freed
        if result is None:
            from .exact_encode_tiled import oom_fallback

            result = oom_fallback(vae, image, options, precision)
        samples = result.latent.to(comfy.model_management.intermediate_device(), torch.float32)
        summary = result.summary()
        # ui.text reaches the browser in the "executed" message: web/ shows it on the node.
        return io.NodeOutput({"samples": samples}, summary, ui=ui.PreviewText(summary))
