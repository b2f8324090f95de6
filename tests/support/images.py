"""The shared test photos as ComfyUI IMAGE tensors (B, H, W, 3) in [0, 1]."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .paths import image_paths


def load_photo(path, size: int = 128) -> torch.Tensor:
    """Resize the short side to `size`, centre-crop to size x size: (1, size, size, 3) float32."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.LANCZOS)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def photos(size: int = 128) -> dict[str, torch.Tensor]:
    return {p.stem: load_photo(p, size) for p in image_paths()}
