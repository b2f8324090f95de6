"""Small image folders for the command-line and Ray tests (seeded, 32-48 px)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .paths import require

KL_SMALL = "models/kl_f8_small"


def kl_small_dir() -> Path:
    return require(KL_SMALL)


def smooth_image(seed: int, width: int, height: int) -> Image.Image:
    """A seeded smooth colour field (upsampled noise): closer to a photo than white noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8))
    return small.resize((width, height), Image.BICUBIC)


def make_images(folder: Path, count: int, sizes=((40, 32),), bad: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        path = folder / f"img{i:02d}.png"
        smooth_image(i, w, h).save(path)
        paths.append(path)
    if bad:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        smooth_image(99, 5, 5).save(folder / "tiny.png")  # below one 8 px latent cell
    return paths
