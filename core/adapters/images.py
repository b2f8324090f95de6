"""Image files -> pixel tensors, with the crop rule the ComfyUI node applies.

Crop rule (the same as ComfyUI's stock VAE Encode): each side is cut down to a multiple of the VAE's
latent cell (8 px for SD/SDXL/SD3/FLUX.1 and TAESD), keeping the centre, so a 100x61 image becomes
96x56 (2 px off the left, 2 off the right, 2 off the top, 3 off the bottom). Images smaller than
one cell are refused, never padded. Alpha is dropped; greyscale and palette images become RGB.

As ComfyUI's Load Image and diffusers' `load_image` do, the EXIF orientation is applied first (a phone photo stored
sideways is encoded upright). 16-bit greyscale keeps its 16 bits (scaled by 1/65535: converting it to RGB, as an
8-bit file is, would clip it to white); a float image must lie in [0, 1]. Pillow reads a 48-bit RGB PNG as 8-bit RGB.
A file with several frames (an animation, a multi-page TIFF) is refused, not cut to its first frame; a camera's MPO
(a JPEG with a preview inside) is read as its main image, as ComfyUI does.
"""
from __future__ import annotations

from pathlib import Path

import torch


def crop_to_cell(pixels: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """(B, C, H, W) -> centre crop with H, W multiples of `cell`.

    >>> crop_to_cell(torch.zeros(1, 3, 61, 100)).shape
    torch.Size([1, 3, 56, 96])
    """
    h, w = pixels.shape[-2:]
    if h < cell or w < cell:
        raise ValueError(f"image is {w}x{h} px, smaller than one latent cell ({cell}x{cell} px)")
    top, left = (h % cell) // 2, (w % cell) // 2
    return pixels[..., top:top + h // cell * cell, left:left + w // cell * cell]


# What a --resume output must have been read with: the loader's rules above, numbered (encode_job.job_key)
LOADER = "2: EXIF orientation, 16-bit grey, one frame"


def load_image(path, cell: int = 8) -> torch.Tensor:
    """An image file as (1, 3, H, W) float32 in [0, 1], cropped by the rule above."""
    from PIL import Image, ImageOps

    with Image.open(Path(path)) as img:
        frames = getattr(img, "n_frames", 1)
        if frames > 1 and img.format != "MPO":
            raise ValueError(f"{Path(path).name}: {frames} frames ({img.format}); the command line encodes still "
                             "images -- extract the frames first (e.g. ffmpeg -i in.gif frame_%04d.png)")
        img.load()  # decode now: a truncated file fails here, with its own message
        rgb = _unit_rgb(ImageOps.exif_transpose(img), Path(path).name)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    return crop_to_cell(pixels.contiguous(), cell)


def _unit_rgb(img, name: str):
    """(H, W, 3) float32 in [0, 1]: 8-bit modes through Pillow's RGB conversion, 16-bit and float grey by value."""
    import numpy as np

    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    grey = np.asarray(img, dtype=np.float64)
    top = 1.0 if img.mode == "F" else 65535.0
    if not np.isfinite(grey).all() or grey.min() < 0 or grey.max() > top:
        raise ValueError(f"{name}: {img.mode} pixels span {grey.min():g}..{grey.max():g}, outside 0..{top:g}; "
                         "save it as an 8- or 16-bit PNG")
    return np.repeat((grey / top).astype(np.float32)[..., None], 3, axis=-1)
