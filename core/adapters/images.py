"""Image files -> pixel tensors, with the crop rule the ComfyUI node applies.

Crop rule (the same as ComfyUI's stock VAE Encode): each side is cut down to a multiple of the VAE's
latent cell (8 px for SD/SDXL/SD3/FLUX.1 and TAESD), keeping the centre, so a 100x61 image becomes
96x56 (2 px off the left, 2 off the right, 2 off the top, 3 off the bottom). Images smaller than
one cell are refused, never padded. Alpha is dropped; greyscale and palette images become RGB.
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


def load_image(path, cell: int = 8) -> torch.Tensor:
    """An image file as (1, 3, H, W) float32 in [0, 1], cropped by the rule above."""
    import numpy as np
    from PIL import Image

    with Image.open(Path(path)) as img:
        img.load()  # decode now: a truncated file fails here, with its own message
        rgb = img.convert("RGB")
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return crop_to_cell(pixels.contiguous(), cell)
