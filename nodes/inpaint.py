"""VAE Exact Encode (for Inpaint) and Image Error (Masked): inpainting that keeps the unmasked area.

Stock VAE Encode (for Inpainting) greys out the masked pixels, encodes with the plain encoder and
attaches the grown mask as "noise_mask"; the sampler then keeps the latent outside the mask, but
its decode D(E(x)) already differs from the image there (colour and detail drift, and it compounds
over repeated inpaint passes). This node follows the same conventions (mask resized to the image,
cropped to whole latent cells, grown by `grow_mask_by`, LATENT {"samples", "noise_mask"}) and
encodes exactly instead, picking the solver iterate whose decode is closest to the image where it
is kept (pixel error weighted by 1 - grown mask).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import comfy.model_management
from comfy_api.latest import io, ui

from ..core import invert, region_error
from .adapter import check_supported, latent_cell, vae_codec
from .inputs import DEFAULT_METHOD, check_choice, image_to_pixels, method_input, solver_options, steps_input
from .progress import iteration_callback

MASKED_AREA = ("keep", "grey")
REGIONS = ("outside mask", "inside mask", "whole image")


def mask_to_pixels(mask, image: torch.Tensor, cell: int | None = None, input_name: str = "mask") -> torch.Tensor:
    """MASK (H, W) / (B, H, W) / (B, 1, H, W) -> (B or 1, 1, H, W) on image's size (B, H, W, C), resized
    bilinearly like stock VAE Encode (for Inpainting) and cropped to whole `cell`s like the image.
    A mask of another aspect ratio is an error unless it is constant (Load Image's 64x64 empty mask)."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
        raise ValueError(f"{input_name}: expected a MASK (B, H, W); got {getattr(mask, 'shape', type(mask))}")
    m = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    if m.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"{input_name}: batch of {m.shape[0]} masks for {image.shape[0]} images; give one mask "
                         "for all images or one per image.")
    if not torch.isfinite(m).all():
        raise ValueError(f"{input_name}: contains NaN or Inf values.")
    h, w = image.shape[1], image.shape[2]
    if (m.shape[-2], m.shape[-1]) != (h, w):
        constant = bool((m.amax() - m.amin()) == 0)
        if not constant and abs(math.log((m.shape[-1] / m.shape[-2]) / (w / h))) > 0.02:
            raise ValueError(
                f"{input_name}: {m.shape[-1]}x{m.shape[-2]} px does not match the image's {w}x{h} px aspect ratio; "
                "paint the mask on this image (Load Image's mask editor) or resize the mask to the image first.")
        m = F.interpolate(m, size=(h, w), mode="bilinear")
    m = m.clamp(0, 1)
    if cell:
        y0, x0 = (h % cell) // 2, (w % cell) // 2
        m = m[:, :, y0:y0 + h // cell * cell, x0:x0 + w // cell * cell]
    return m


def grow(mask: torch.Tensor, by: int) -> torch.Tensor:
    """Stock VAE Encode (for Inpainting)'s growth: rounded mask dilated by a `by` x `by` box."""
    if by == 0:
        return mask.round()
    kernel = torch.ones((1, 1, by, by), device=mask.device)
    padding = math.ceil((by - 1) / 2)
    grown = F.conv2d(mask.round(), kernel, padding=padding).clamp(0, 1)
    return grown[:, :, :mask.shape[2], :mask.shape[3]].round()


class VAEExactEncodeForInpaint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEExactEncodeForInpaint",
            display_name="VAE Exact Encode (for Inpaint)",
            category="latent/inpaint",
            description=(
                "Inpainting without drift outside the mask: encodes the image exactly (the decode reproduces "
                "it where it is kept) and attaches the grown mask as noise_mask, like stock VAE Encode (for "
                "Inpainting) / Set Latent Noise Mask. Sample with it, decode, and optionally paste the result "
                "into the original with ImageCompositeMasked."),
            inputs=[
                io.Image.Input("pixels", tooltip="The image to inpaint."),
                io.Vae.Input("vae"),
                io.Mask.Input("mask", tooltip="1 where the image is regenerated (Load Image's mask editor)."),
                io.Int.Input("grow_mask_by", default=6, min=0, max=64,
                             tooltip="Grow the noise mask by this many pixels, as stock does, for seamless edges."),
                steps_input(tooltip="VAE Exact Encode iterations."),
                method_input(tooltip="See VAE Exact Encode."),
                io.Combo.Input("masked_area", options=list(MASKED_AREA), default="keep", optional=True,
                               tooltip="keep: encode the masked area as it is (for ordinary models, any denoise, "
                                       "like Set Latent Noise Mask). grey: fill it with 0.5 grey first, as stock "
                                       "VAE Encode (for Inpainting) does for inpainting models at denoise 1."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT",
                                 tooltip="{samples, noise_mask}, like VAE Encode (for Inpainting)."),
                io.String.Output(display_name="summary", tooltip="PSNR of the decode outside the grown mask, "
                                                                 "plain encoder vs exact."),
            ],
        )

    @classmethod
    def execute(cls, pixels, vae, mask, grow_mask_by=6, steps=100, method=DEFAULT_METHOD,
                masked_area="keep") -> io.NodeOutput:
        check_supported(vae)
        options = solver_options(cls, method, steps)
        check_choice("masked_area", masked_area, MASKED_AREA)
        if not isinstance(grow_mask_by, int) or not 0 <= grow_mask_by <= 64:
            raise ValueError(f"grow_mask_by: an integer from 0 to 64 (stock default 6); got {grow_mask_by!r}")
        image = image_to_pixels(pixels, vae)  # (B, 3, H, W), cropped to whole cells
        cell = latent_cell(vae)
        cropped = tuple(image.shape[2:]) != tuple(pixels.shape[1:3])  # VAEs with crop_input=False keep all
        m = mask_to_pixels(mask, pixels[..., :3], cell if cropped else None)  # (B or 1, 1, H, W), same crop
        noise_mask = grow(m, grow_mask_by)
        if masked_area == "grey":
            image = (image - 0.5) * (1.0 - m.round()) + 0.5
        codec = vae_codec(vae, "auto", tuple(image.shape))
        keep = 1.0 - noise_mask
        result = invert(codec, image, options, callback=iteration_callback(steps), weight=keep)
        samples = result.latent.to(comfy.model_management.intermediate_device(), torch.float32)
        kept_pixels = keep.expand(image.shape[0], 1, *keep.shape[2:]).flatten(1).sum(1)
        lines = []
        for i, s in enumerate(result.samples):
            if kept_pixels[i] == 0:  # as Image Error (Masked): no number for a region that is not there
                lines.append(f"image {i + 1}: the region outside the grown mask is empty (the mask covers the "
                             "whole image), so nothing is kept to measure; shrink the mask or lower grow_mask_by.")
                continue
            lines.append(f"image {i + 1}: PSNR of the decode outside the grown mask {s.psnr_initial:.2f} -> "
                         f"{s.psnr_best:.2f} dB ({s.gain_db:+.2f} dB), best at iteration {s.best_iteration}")
        lines.append(f"{method}, {result.seconds:.2f} s; masked area: {masked_area}, mask grown by {grow_mask_by} px")
        lines += result.notes()
        summary = "\n".join(lines)
        latent = {"samples": samples,
                  "noise_mask": noise_mask.to(comfy.model_management.intermediate_device())}
        return io.NodeOutput(latent, summary, ui=ui.PreviewText(summary))


class ImageMaskedError(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExactEncodeImageMaskedError",
            display_name="Image Error (Masked)",
            category="image/analysis",
            is_output_node=True,
            description="PSNR and max absolute error of an image against a reference, outside or inside a mask: "
                        "e.g. how much an inpainting pass changed the area it should keep.",
            inputs=[
                io.Image.Input("reference", tooltip="The original image."),
                io.Image.Input("image", tooltip="The edited image, same size."),
                io.Combo.Input("region", options=list(REGIONS), default="outside mask"),
                io.Int.Input("grow_mask_by", default=0, min=0, max=256,
                             tooltip="Grow the mask by this many pixels before measuring (e.g. to leave out the "
                                     "band a grown noise mask lets the sampler change)."),
                io.Mask.Input("mask", optional=True, tooltip="Without a mask the whole image is measured."),
            ],
            outputs=[
                io.Float.Output(display_name="psnr", tooltip="dB, mean over the batch; inf when identical."),
                io.Float.Output(display_name="max_abs_error", tooltip="0-1 scale, max over the batch."),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, reference, image, region="outside mask", grow_mask_by=0, mask=None) -> io.NodeOutput:
        for name, t in (("reference", reference), ("image", image)):
            if not isinstance(t, torch.Tensor) or t.ndim != 4:
                raise ValueError(f"{name}: expected an IMAGE batch (B, H, W, C); got {getattr(t, 'shape', type(t))}")
        check_choice("region", region, REGIONS)
        if reference.shape[1:3] != image.shape[1:3]:
            raise ValueError(f"image: {image.shape[2]}x{image.shape[1]} px but reference: {reference.shape[2]}x"
                             f"{reference.shape[1]} px; compare images of the same size.")
        if reference.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"reference: batch of {reference.shape[0]} for {image.shape[0]} images; give one "
                             "reference or one per image.")
        a = image[..., :3].movedim(-1, 1).float()
        b = reference[..., :3].movedim(-1, 1).float().expand_as(a)
        sel = None
        if region != "whole image":
            if mask is None:
                raise ValueError(f"mask: region '{region}' needs a mask; connect one or set region to 'whole image'.")
            m = grow(mask_to_pixels(mask, image), grow_mask_by)
            sel = m if region == "inside mask" else 1.0 - m
        stats = region_error(a, b, sel)
        lines = [f"error {region}"
                 + (f" (mask grown by {grow_mask_by} px)" if sel is not None and grow_mask_by else "")]
        for i, s in enumerate(stats):
            if s["psnr"] is None:
                lines.append(f"image {i + 1}: the region is empty")
            else:
                psnr = "inf (identical)" if s["psnr"] == math.inf else f"{s['psnr']:.2f} dB"
                lines.append(f"image {i + 1}: PSNR {psnr}, max abs error {s['max_abs']:.4f} over {s['pixels']} px")
        valid = [s for s in stats if s["psnr"] is not None]
        psnr = (sum(s["psnr"] for s in valid) / len(valid)) if valid else float("nan")
        max_abs = max((s["max_abs"] for s in valid), default=float("nan"))
        report = "\n".join(lines)
        return io.NodeOutput(float(psnr), float(max_abs), report, ui=ui.PreviewText(report))
