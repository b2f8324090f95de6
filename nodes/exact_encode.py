"""VAE Exact Encode (Gradient-Free): the latent whose decode reproduces the image."""
from __future__ import annotations

from dataclasses import replace

import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io, ui

from ..core import METHODS, InversionOptions, invert
from . import trace
from .adapter import PRECISIONS, latent_cell, vae_codec, check_supported, is_oom, to_vae_layout

PROGRESS_EVENT = "exact_encode.progress"  # web/exact_encode.js draws the live sparkline from it
ITERATE_BUDGET = 256 * 2**20  # bytes of host memory for the assumption check's kept iterates


def record_every(steps: int, latent_numel: int) -> int:
    """Keep every n-th iterate so that z_k and T z_k (fp32) fit ITERATE_BUDGET."""
    per_iterate = 2 * 4 * latent_numel
    return max(1, -(-(steps + 1) * per_iterate // ITERATE_BUDGET))


def progress_sender(node_id):
    """Sends each iteration's per-image PSNR and residual to the browser, keyed by node id
    (a no-op outside a running server, e.g. when the node is called from a script)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return None
    context = get_executing_context()
    node_id = node_id if node_id is not None else getattr(context, "node_id", None)
    server = getattr(PromptServer, "instance", None)
    if server is None or node_id is None:
        return None
    prompt_id = getattr(context, "prompt_id", None)

    def send(k, total, info):
        server.send_sync(PROGRESS_EVENT, {
            "node": str(node_id), "prompt_id": prompt_id, "iteration": k, "steps": total,
            "psnr": [None if v != v or abs(v) == float("inf") else v for v in info["psnr"]],
            "residual_db": [None if v != v or abs(v) == float("inf") else v for v in info["residual_db"]]},
            server.client_id)
    return send


def image_to_pixels(image: torch.Tensor, vae, input_name: str = "pixels") -> torch.Tensor:
    """IMAGE (B, H, W, C) -> (B, 3, H, W), cropped like stock VAEEncode, or a clear error."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(f"{input_name}: expected an IMAGE batch (B, H, W, C); got {getattr(image, 'shape', type(image))}")
    if image.shape[0] == 0:
        raise ValueError(f"{input_name}: the batch is empty; connect a node that outputs at least one image.")
    channels = image.shape[-1]
    if channels == 4:
        image = image[..., :3]  # drop alpha, as stock VAE Encode does
    elif channels != 3:
        raise ValueError(f"{input_name}: has {channels} channel(s); VAE Exact Encode needs RGB. Convert it first "
                         "(for a mask or grey image, 'Convert Mask to Image' gives RGB).")
    cell = latent_cell(vae)
    if image.shape[1] < cell or image.shape[2] < cell:
        raise ValueError(f"{input_name}: {image.shape[2]}x{image.shape[1]} px is smaller than one latent cell of this "
                         f"VAE ({cell}x{cell} px); upscale or pad it to at least {cell} px per side.")
    if not torch.isfinite(image).all():
        raise ValueError(f"{input_name}: contains NaN or Inf pixels; fix the node that produced it.")
    return to_vae_layout(vae.vae_encode_crop_pixels(image), vae)  # video VAEs: the batch is one clip


def solver_inputs() -> list:
    """method, learning_rate, precision: shared by VAE Exact Encode and its tiled variant."""
    return [
        io.Combo.Input("method", options=list(METHODS), default=InversionOptions().method,
                       tooltip="anderson (default): safeguarded Anderson acceleration of the "
                               "fixed-point step, the fastest here. adam: the paper's method (Adam "
                               "moments on the residual, warm-up + cosine schedule). forward: plain "
                               "fixed-point step. km: inertial Krasnoselskii-Mann (forward step with "
                               "momentum). gradient: baseline that backpropagates through the decoder "
                               "(slower, far more memory)."),
        io.Float.Input("learning_rate", default=1.0, min=0.0001, max=100.0, step=0.01, optional=True,
                       tooltip="(advanced) Multiplier on the method's tuned step: 1.0 = lr 0.01 x "
                               "RMS of the latent for adam/gradient (the paper's 0.01 on SD-scaled "
                               "latents, for any VAE), step 0.5 for forward/km/anderson."),
        io.Combo.Input("precision", options=list(PRECISIONS), default="auto", optional=True,
                       tooltip="(advanced) Dtype of the encoder/decoder passes; optimizer state stays "
                               "fp32. auto = the VAE's own dtype. fp16/bf16 halve memory and are "
                               "faster on GPUs; other than auto, a cast copy of the VAE is used."),
    ]


def solver_options(node: str, method: str, steps: int, learning_rate: float, precision: str,
                   **extra) -> InversionOptions:
    """Validated options from the node's inputs, or an error naming the input.
    V3 combos are not checked against their options by the 0.3.75 validator: done here."""
    if method not in METHODS:
        raise ValueError(f"method: must be one of {', '.join(METHODS)}; got {method!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate: must be > 0 (1.0 is the method's default); got {learning_rate}")
    options = InversionOptions(method=method, steps=steps,
                               lr=learning_rate * InversionOptions(method=method).step_size, **extra)
    try:
        return options.validate()
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from None


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
                *solver_inputs(),
                io.Float.Input("tolerance", default=0.0, min=0.0, max=1.0, step=0.0001, optional=True,
                               tooltip="(advanced) Stop an image early once ||E(D(z)) - E(x)|| / ||E(x)|| "
                                       "falls to this value. 0 runs all steps."),
                io.Boolean.Input("check_assumption", default=True, optional=True,
                                 tooltip="(advanced) Keep the iterates (host memory, at most 256 MB) to test "
                                         "the paper's convergence assumption (cocoercivity) along the run; "
                                         "Inversion Diagnostics reports it. Off saves that memory."),
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
                tolerance=0.0, check_assumption=True) -> io.NodeOutput:
        check_supported(vae)
        options = solver_options("VAE Exact Encode", method, steps, learning_rate, precision, tolerance=tolerance)
        image = image_to_pixels(pixels, vae)
        if check_assumption:
            # upper bound (video VAEs also compress time): only sizes the assumption check's budget
            latent_numel = image.numel() // 3 // latent_cell(vae) ** 2 * vae.latent_channels
            options = replace(options, record_every=record_every(steps, latent_numel))
        progress = comfy.utils.ProgressBar(steps)
        send = progress_sender(getattr(getattr(cls, "hidden", None), "unique_id", None))

        def on_iteration(k, total, info):
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(k, total)
            if send is not None:
                send(k, total, info)

        result = None
        try:
            result = invert(vae_codec(vae, precision, tuple(image.shape)), image, options, callback=on_iteration)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is caught, the rest re-raised
            if not is_oom(e):
                raise
            # like stock VAE Encode: leave the except block first so the failed run's memory is freed
        if result is None:
            from .exact_encode_tiled import oom_fallback

            result = oom_fallback(vae, image, options, precision)
        samples = result.latent.to(comfy.model_management.intermediate_device(), torch.float32)
        trace.attach(samples, result)  # for Inversion Diagnostics; invisible to every other node
        summary = result.summary()
        # ui.text reaches the browser in the "executed" message: web/ shows it on the node.
        return io.NodeOutput({"samples": samples}, summary, ui=ui.PreviewText(summary))
