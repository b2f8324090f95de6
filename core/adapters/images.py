"""Image files -> pixel tensors, with the crop rule the ComfyUI node applies.

Crop rule (the same as ComfyUI's stock VAE Encode): each side is cut down to a multiple of the VAE's
latent cell (8 px for SD/SDXL/SD3/FLUX.1 and TAESD), keeping the centre, so a 100x61 image becomes
96x56 (2 px off the left, 2 off the right, 2 off the top, 3 off the bottom). Images smaller than
one cell are refused, never padded. Alpha is dropped; greyscale and palette images become RGB.

As ComfyUI's Load Image and diffusers' `load_image` do, the EXIF orientation is applied first (a phone photo stored
sideways is encoded upright). 16-bit greyscale keeps its 16 bits (scaled by 1/65535: converting it to RGB, as an
8-bit file is, would clip it to white); a float image must lie in [0, 1]. 16-bit colour PNGs (48-bit RGB, 64-bit
RGBA, 16-bit grey with alpha), which Pillow would read as 8-bit, are read at depth with pypng (the `cli` / `ray`
extras); other 16-bit colour files (TIFF, PPM) are refused with the fix, not cut to 8 bits.
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
LOADER = "3: EXIF orientation, 16-bit grey and colour PNG, one frame"


def load_image(path, cell: int = 8) -> torch.Tensor:
    """An image file as (1, 3, H, W) float32 in [0, 1], cropped by the rule above."""
    from PIL import Image, ImageOps

    with Image.open(Path(path)) as img:
        frames = getattr(img, "n_frames", 1)
        if frames > 1 and img.format != "MPO":
            raise ValueError(f"{Path(path).name}: {frames} frames ({img.format}); the command line encodes still "
                             "images -- extract the frames first (e.g. ffmpeg -i in.gif frame_%04d.png)")
        if _sixteen_bit_colour(img):  # read off the undecoded tiles: pypng decodes it, Pillow's 8 bits are not needed
            rgb = _oriented(_deep_png_rgb(Path(path), img.format), img)
        else:
            img.load()  # decode now: a truncated file fails here, with its own message
            rgb = _unit_rgb(ImageOps.exif_transpose(img), Path(path).name)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    return crop_to_cell(pixels.contiguous(), cell)


def upright_size(path) -> tuple[int, int]:
    """(width, height) of the image as load_image reads it, before its crop: a sideways-stored phone photo (EXIF
    orientations 5-8 turn it by 90 degrees) is as wide as its stored height. Reads the header only."""
    from PIL import Image

    with Image.open(Path(path)) as img:
        width, height = img.size
        turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


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


def _sixteen_bit_colour(img) -> bool:
    """True where the file stores 16 bits per colour channel that Pillow decodes to 8 (raw mode "RGB;16B" and kin,
    a PPM's maxval over 255)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return False  # greyscale: Pillow keeps its depth (_unit_rgb)
    for tile in img.tile:
        args = tile.args if isinstance(tile.args, tuple) else (tile.args,)
        if isinstance(args[0], str) and ";16" in args[0]:  # PNG, TIFF
            return True
        if tile.codec_name == "ppm" and len(args) > 1 and args[1] > 255:  # a P6 with 16-bit maxval
            return True
    return False


def _deep_png_rgb(path: Path, fmt: str):
    """(H, W, 3) float32 in [0, 1] from a 16-bit-per-channel PNG, alpha dropped, grey repeated."""
    import numpy as np

    if fmt != "PNG":
        raise ValueError(f"{path.name}: 16 bits per colour channel ({fmt}), which would be read as 8 bits; "
                         "save it as a 16-bit PNG (read at depth) or as 8 bits")
    try:
        import png  # pypng: Pillow has no 16-bit colour mode
    except ImportError as err:
        raise ImportError(f"{path.name} is a 16-bit colour PNG: reading it at depth needs pypng "
                          "(pip install 'comfyui-exact-encode[cli]' or pip install pypng)") from err
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    values = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, planes)
    colour = values[..., :3] if planes >= 3 else np.repeat(values[..., :1], 3, axis=-1)
    return colour.astype(np.float32) / float(2 ** info["bitdepth"] - 1)


def _oriented(rgb, img):
    """`rgb` (read apart from Pillow) turned by the file's EXIF orientation, with Pillow's own table: the pixel
    indices go through ImageOps.exif_transpose as a 32-bit image carrying the file's EXIF."""
    import numpy as np
    from PIL import Image, ImageOps

    height, width = rgb.shape[:2]
    index = Image.fromarray(np.arange(height * width, dtype=np.int32).reshape(height, width))
    index.info["exif"] = img.getexif().tobytes()
    turned = np.asarray(ImageOps.exif_transpose(index))
    return np.ascontiguousarray(rgb.reshape(-1, 3)[turned])
