"""Input builders and checks shared by the nodes: one definition of each common input (steps,
method, precision, ...) and one check per kind of value, so defaults, limits and error texts
cannot drift apart between nodes. Errors name the input and say how to fix it."""
from __future__ import annotations

import torch

from comfy_api.latest import io

from ..core import METHODS, InversionOptions
from ..core.solver import CHECKPOINTS, REPORTED_RESIDUAL_EVERY, RIVAL_NAMES
from ..core.twin import SELECTIONS
from .adapter import PRECISIONS, latent_cell, to_vae_layout

DEFAULT_METHOD = InversionOptions().method
ITERATE_BUDGET = 256 * 2**20  # bytes of host memory for the assumption check's kept iterates
METHOD_TOOLTIP = ("anderson (default): safeguarded Anderson acceleration of the fixed-point step, the fastest "
                  "here. adam: the paper's method (Adam moments on the residual, warm-up + cosine schedule). "
                  "forward: plain fixed-point step. km: inertial Krasnoselskii-Mann (forward step with momentum). "
                  "gradient: baseline that backpropagates through the decoder (slower, far more memory). "
                  "diis: gradient steps mixed by their pixel error (DIIS), the highest PSNR on TAEF2-like VAEs whose "
                  "encoder is not the decoder's inverse; the memory of a backward pass. "
                  "hybrid: anderson until it stops paying; where its decode did not reach the image's noise floor, "
                  "diis from its best of the first 3 iterates, within memory_limit_mb (fast on jointly trained VAEs, "
                  "the memory of a backward pass).")


def title(node_cls) -> str:
    """The node's title as the user sees it (the schema's display name), for error messages."""
    return node_cls.define_schema().display_name


def check_choice(name: str, value, options) -> None:
    """V3 combos are not checked against their options by the 0.3.75 validator: done here."""
    if value not in options:
        raise ValueError(f"{name}: must be one of {', '.join(options)}; got {value!r}")


STEPS_TOOLTIP = ("Iterations; each costs one decoder and one encoder pass. 100 follows the paper; the best "
                 "iterate is returned.")


def steps_input(default: int = 100, tooltip: str = STEPS_TOOLTIP) -> io.Int.Input:
    return io.Int.Input("steps", default=default, min=1, max=10000, tooltip=tooltip)


def method_input(options=METHODS, tooltip: str = METHOD_TOOLTIP) -> io.Combo.Input:
    return io.Combo.Input("method", options=list(options), default=DEFAULT_METHOD, tooltip=tooltip)


def precision_input(tooltip: str = "(advanced) Dtype of the encoder/decoder passes; optimizer state stays fp32. "
                                   "auto = the VAE's own dtype. fp16/bf16 halve memory and are faster on GPUs; "
                                   "other than auto, a cast copy of the VAE is used.") -> io.Combo.Input:
    return io.Combo.Input("precision", options=list(PRECISIONS), default="auto", optional=True, tooltip=tooltip)


def solver_inputs() -> list:
    """method, learning_rate, precision: shared by VAE Exact Encode and its tiled variant."""
    return [
        method_input(),
        io.Float.Input("learning_rate", default=1.0, min=0.0001, max=100.0, step=0.01, optional=True,
                       tooltip="(advanced) Multiplier on the method's tuned step: 1.0 = lr 0.01 x "
                               "RMS of the latent for adam/gradient (the paper's 0.01 on SD-scaled "
                               "latents, for any VAE), 0.02 x RMS for diis, step 0.5 for forward/km/anderson."),
        precision_input(),
    ]


def stop_inputs() -> list:
    """auto_stop, time_budget, memory_limit_mb, select, rival, checkpoint: after every other input of a node, each new
    one last, so that widget values saved in older workflows (positional) still land on the inputs they were meant
    for."""
    return [
        io.Boolean.Input("auto_stop", default=True, optional=True,
                         tooltip="Stop an image once it found no better iterate for 20 iterations while its "
                                 "residual stayed flat (within 1 dB): the returned latent is the one a full "
                                 "run would return in the benchmark. Off runs all steps."),
        io.Float.Input("time_budget", default=0.0, min=0.0, max=86400.0, step=1.0, optional=True,
                       tooltip="(advanced) Seconds; the run stops at the first check past it and returns its "
                               "best iterate so far. 0 = no limit."),
        io.Int.Input("memory_limit_mb", default=0, min=0, max=1 << 20, optional=True,
                     tooltip="(advanced) hybrid and the rival: cap in MiB on the decoder activations their gradient "
                             "steps keep; above it, with checkpoint auto, the decoder's blocks are recomputed in the "
                             "backward where that fits, else the run stays gradient-free (gradient and diis: "
                             "recomputed above it). 0 = ComfyUI's free-memory "
                             "estimate of the VAE's device (on the CPU the host's available memory)."),
        io.Combo.Input("select", options=list(SELECTIONS), default="auto", optional=True,
                       tooltip="(advanced) Which iterate is returned. auto: where the decode cannot reach the "
                               "image's 8-bit noise floor (e.g. TAEF2), the one a twin problem with a known "
                               "answer, run alongside, finds closest in the latent (the pixel-best one can "
                               "drift away from the true latent), never one after the pixel-best; where it "
                               "does, the first iterate at that noise level (later ones fit the rounding "
                               "noise), gone on from by damped forward steps as far as the twin finds "
                               "closer, else the pixel-best. pixel: always the "
                               "pixel-best (sharpest decode). twin: always the twin's pick. The twin doubles "
                               "the batch; gradient methods use pixel under auto, fp16/bf16 the codec's own "
                               "noise floor where it is below the 8-bit one."),
        io.Combo.Input("rival", options=list(RIVAL_NAMES), default="diis", optional=True,
                       tooltip="(advanced) Where the twin picked (the decode stayed below the noise floor), run "
                               "the image again with this gradient method and its own twin, from the better (in "
                               "pixels) of the plain encoding and the first fixed-point step, then once more from "
                               "the fixed point's sharpest iterate, and keep the run whose twin behaved like it, "
                               "else whose twin got closer to "
                               "its known answer: on TAEF2 2.3-7.2 dB closer to the true latent on most images, for "
                               "2-5x the time and a backward pass's memory (within memory_limit_mb); it stops as "
                               "soon as it can no longer win. off: gradient-free throughout."),
        io.Combo.Input("checkpoint", options=list(CHECKPOINTS), default="auto", optional=True,
                       tooltip="(advanced) Decoder activations of gradient steps (gradient, diis, hybrid, the rival). "
                               "on: recompute each decoder block's in the backward pass (SD decoder at 512 px: "
                               "0.43x the memory for the same gradient, +15-25 % backward time). off: keep them all. "
                               "auto: keep them unless that exceeds memory_limit_mb (hybrid, rival) and recomputing "
                               "fits, where the gradient steps would otherwise be skipped."),
    ]


def solver_options(node_cls, method: str, steps: int, learning_rate: float = 1.0, precision: str = "auto",
                   methods=METHODS, auto_stop: bool = True, **extra) -> InversionOptions:
    """Validated options from the node's inputs, or an error naming the input. `extra` takes
    InversionOptions fields by name (tolerance, time_budget, memory_limit_mb, ...)."""
    check_choice("method", method, methods)
    if not auto_stop:
        extra["stall_steps"] = 0
    extra.setdefault("residual_every", REPORTED_RESIDUAL_EVERY)  # gradient methods: the plot's residual
    check_choice("precision", precision, PRECISIONS)
    if "select" in extra:
        check_choice("select", extra["select"], SELECTIONS)
    if "rival" in extra:
        check_choice("rival", extra["rival"], RIVAL_NAMES)
        extra["rival"] = RIVAL_NAMES[extra["rival"]]
    if "checkpoint" in extra:
        check_choice("checkpoint", extra["checkpoint"], CHECKPOINTS)
    if not learning_rate > 0:
        raise ValueError(f"learning_rate: must be > 0 (1.0 is the method's default); got {learning_rate}")
    options = InversionOptions(method=method, steps=steps,
                               lr=learning_rate * InversionOptions(method=method).step_size, **extra)
    try:
        return options.validate()
    except ValueError as e:
        raise ValueError(f"{title(node_cls)}: {e}") from None


def record_every(steps: int, latent_numel: int, residual_every: int = 1) -> int:
    """Keep every n-th iterate so that z_k and T z_k (fp32) fit ITERATE_BUDGET; n a multiple of
    `residual_every` (the kept iterates need their residual)."""
    per_iterate = 2 * 4 * latent_numel
    n = max(1, -(-(steps + 1) * per_iterate // ITERATE_BUDGET))
    return -(-n // residual_every) * residual_every


def check_finite(t: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or Inf values; fix the node that produced it.")
    return t


def latent_samples(latent, name: str = "latent", ndim: int | tuple | None = 4, finite: bool = False) -> torch.Tensor:
    """The `samples` tensor of a LATENT input, or an error naming the input. `ndim` 4 is an image
    latent (B, C, H, W); an empty batch is always an error (nothing to compute on)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"{name}: expected a LATENT (a dict with 'samples'); connect e.g. a VAE Encode output.")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if samples.is_nested or (dims is not None and samples.ndim not in dims):
        what = "an image latent (B, C, H, W)" if dims == (4,) else f"a {' or '.join(map(str, dims))}-D latent"
        raise ValueError(f"{name}: expected {what}; got shape {tuple(samples.shape)}. "
                         + ("Video and audio latents are not supported." if dims == (4,) else ""))
    if samples.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty; connect a latent with at least one sample.")
    return check_finite(samples, name) if finite else samples


def image_to_pixels(image: torch.Tensor, vae, input_name: str = "pixels") -> torch.Tensor:
    """IMAGE (B, H, W, C) -> (B, 3, H, W), cropped like stock VAEEncode, or a clear error."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(f"{input_name}: expected an IMAGE batch (B, H, W, C); "
                         f"got {getattr(image, 'shape', type(image))}")
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
