"""Turns a ComfyUI `VAE` into the `Codec` the solver inverts, on the VAE's own device.

The stock `vae.encode/decode` move every result to the output device and clamp on each call;
inside a 100-iteration loop that is 200 host-device round trips. This adapter loads the model
once with ComfyUI's memory manager and then calls `first_stage_model.encode/decode` directly,
with ComfyUI's `process_input/process_output`, so every tensor of the loop stays on the device.
"""
from __future__ import annotations

import copy

import torch

import comfy.model_management

from ..core import Codec
from ..core.checkpointing import recomputable

PRECISIONS = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UnsupportedVAE(ValueError):
    pass


def is_oom(error: BaseException) -> bool:
    """Out of memory, as ComfyUI counts it: newer versions also report it as torch.AcceleratorError
    and say so through model_management.is_oom (docs/compat.md); 0.3.75 has only OOM_EXCEPTION."""
    host_is_oom = getattr(comfy.model_management, "is_oom", None)
    if host_is_oom is not None:
        return bool(host_is_oom(error))
    return isinstance(error, comfy.model_management.OOM_EXCEPTION)


def check_supported(vae) -> None:
    """Raise with the reason and the alternative when this VAE cannot be inverted here."""
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise UnsupportedVAE("vae: this VAE is empty (the checkpoint holds no VAE weights). "
                             "Load a VAE file with 'Load VAE' and connect it instead.")
    kind = type(vae.first_stage_model).__name__
    if getattr(vae, "latent_dim", 2) not in (2, 3):
        raise UnsupportedVAE(
            f"vae: {kind} has {vae.latent_dim}-D latents (an audio or 3-D shape VAE). VAE Exact Encode "
            "handles image VAEs and video VAEs that decode RGB frames; use the stock 'VAE Encode' for this one.")
    if getattr(vae, "extra_1d_channel", None) is not None or getattr(vae, "output_channels", 3) != 3:
        raise UnsupportedVAE(f"vae: {kind} does not decode to RGB images, so its decoder cannot be "
                             "inverted against an image; use the stock 'VAE Encode'.")
    # Newer ComfyUI (docs/compat.md): some VAEs post-process the encoder's output (format_encoded)
    # or stream it in chunks (comfy_has_chunked_io); calling first_stage_model directly, as this
    # adapter does, would skip that. None of these exist in 0.3.75, hence getattr.
    if (getattr(vae, "format_encoded", None) is not None
            or getattr(vae.first_stage_model, "comfy_has_chunked_io", False)):
        raise UnsupportedVAE(f"vae: {kind} encodes through its own chunked or post-processed path, which "
                             "VAE Exact Encode cannot invert; use the stock 'VAE Encode' for this one.")


def latent_cell(vae) -> int:
    """Pixels per latent cell along each side (8 for SD/FLUX VAEs)."""
    return int(vae.spacial_compression_encode())


def is_video(vae) -> bool:
    """A VAE that takes a frame batch as one clip (B, 3, T, H, W), as stock VAE Encode passes it.
    3-D VAEs marked `not_video` (e.g. an image refiner with 3-D layers) take each image as a
    one-frame clip instead."""
    return getattr(vae, "latent_dim", 2) == 3 and not getattr(vae, "not_video", False)


def temporal_factor(vae) -> int | None:
    """Pixel frames per latent frame after the first (4 for Wan), None for image VAEs."""
    return vae.temporal_compression_decode() if is_video(vae) else None


def latent_frames(vae, frames: int) -> int:
    """Latent frames for `frames` pixel frames, or an error naming `pixels` when the VAE cannot
    decode back to that many frames (its decoder makes upscale(downscale(T)) frames)."""
    down, up = vae.downscale_ratio[0], vae.upscale_ratio[0]
    n = int(down(frames))
    if n < 1 or int(up(n)) != frames:
        factor = temporal_factor(vae) or 1
        lo = 1 + (max(frames, 1) - 1) // factor * factor
        hi = lo + factor
        raise ValueError(
            f"pixels: {frames} frames, but this video VAE ({type(vae.first_stage_model).__name__}) decodes "
            f"1 + {factor}k frames (1, {1 + factor}, {1 + 2 * factor}, ...), so no latent reproduces {frames} "
            f"frames; trim the batch to {lo} frames or extend it to {hi}.")
    return n


def to_vae_layout(pixels: torch.Tensor, vae) -> torch.Tensor:
    """Cropped IMAGE (B, H, W, 3) -> what stock VAE Encode hands the model: (B, 3, H, W) for image
    VAEs, the batch as one clip (1, 3, T, H, W) for video VAEs (frame count checked), (B, 3, 1, H, W)
    for 3-D VAEs that are not video."""
    x = pixels.movedim(-1, 1)
    if getattr(vae, "latent_dim", 2) != 3:
        return x
    if not is_video(vae):
        return x.unsqueeze(2)
    latent_frames(vae, x.shape[0])
    return x.movedim(1, 0).unsqueeze(0)


def latent_shape(vae, shape: tuple) -> tuple:
    """Latent shape for a model input of `shape` (4-D or 5-D)."""
    cell = latent_cell(vae)
    spatial = (shape[-2] // cell, shape[-1] // cell)
    if len(shape) == 5:
        t = latent_frames(vae, shape[2]) if is_video(vae) else shape[2]
        return (shape[0], vae.latent_channels, t) + spatial
    return (shape[0], vae.latent_channels) + spatial


def memory_cap_mb(vae, requested_mb: float) -> float:
    """The cap on the hybrid's and the rival's backward-pass activations: the user's, else ComfyUI's
    free-memory estimate of the VAE's device (on a GPU a backward pass competes with the models ComfyUI
    keeps loaded; on the CPU it is the host's available memory, which a full SD decoder's backward at
    1024 px, ~27 GiB, would exceed on most machines). Newer ComfyUI asks the VAE's patcher, as its own VAE decode
    does: with dynamic VRAM (on by default there) the global estimate leaves out weights it can page out and reads
    near 0 (docs/compat.md)."""
    if requested_mb > 0:
        return float(requested_mb)
    device = torch.device(getattr(vae, "device", "cpu"))
    patcher_free = getattr(getattr(vae, "patcher", None), "get_free_memory", None)
    free = patcher_free(device) if patcher_free else comfy.model_management.get_free_memory(device)
    return free / 2**20


def _copy_of(model, dtype: torch.dtype, purpose: str):
    """A private copy of the VAE's model in `dtype`, so the shared VAE other nodes use is never changed; an error
    naming the input where the host's model cannot be copied (docs/compat.md: newer ComfyUI's dynamic VRAM may page
    its weights, not verified)."""
    try:
        return copy.deepcopy(model).to(dtype)
    except (RuntimeError, TypeError) as e:
        raise UnsupportedVAE(f"{purpose} needs a copy of its model, which this host refused ({type(e).__name__}: {e}); "
                             "use precision 'auto' and a gradient-free method, which run the VAE as loaded.") from e


def vae_codec(vae, precision: str = "auto", image_shape: tuple | None = None) -> Codec:
    """Codec for `vae` computing in `precision` (auto = the dtype ComfyUI chose for this VAE).

    A precision other than the VAE's own runs on a cast copy of the model, so the shared VAE
    that other nodes use is never modified.
    """
    check_supported(vae)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    dtype = PRECISIONS[precision] or vae.vae_dtype
    memory = 0
    if image_shape is not None:  # model input shape: ComfyUI's own estimates, encode + decode
        memory = (vae.memory_used_encode(image_shape, dtype)
                  + vae.memory_used_decode(latent_shape(vae, tuple(image_shape)), dtype))
    # Under inference_mode whatever the caller's mode, as ComfyUI's executor loads models. Called from a script
    # (outside it) on CUDA, where ComfyUI keeps the VAE in bf16 so that bf16/auto run the shared model itself,
    # loading it onto the GPU left its convolutions failing ("Inference tensors do not track version counter":
    # bench/results/2026-12-04-cuda-nvidia-h200-gpu-precision.md, bf16 rows; loaded here, -precision-bf16.md).
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([vae.patcher], memory_required=memory,
                                               force_full_load=vae.disable_offload)
        model = vae.first_stage_model
        if dtype != vae.vae_dtype:
            model = _copy_of(model, dtype, f"precision: running this VAE in {precision}")

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        try:
            return model.encode(vae.process_input(pixels).to(dtype))
        except NotImplementedError as e:  # decoder-only tiny autoencoders
            raise UnsupportedVAE(f"vae: this VAE cannot encode ({e}); exact encoding needs an encoder.") from e

    def decode(latent: torch.Tensor) -> torch.Tensor:
        return vae.process_output(model.decode(latent.to(dtype)))

    def grad_decode():
        # The gradient baseline needs weights that are ordinary tensors: a model built while
        # ComfyUI ran a loader node under inference_mode holds inference tensors, which
        # autograd refuses. A private fp32 copy also keeps the shared VAE untouched, and may have its blocks
        # recomputed in the backward (InversionOptions.checkpoint).
        with torch.inference_mode(False):
            model32 = _copy_of(vae.first_stage_model, torch.float32, "gradient steps").requires_grad_(False)
        return recomputable(lambda z: vae.process_output(model32.decode(z)), model32)

    return Codec(encode=encode, decode=decode, dtype=dtype, device=vae.device, grad_decode=grad_decode)
