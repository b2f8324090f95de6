"""Round-trip drift: what repeated encode -> decode generations do to an image.

Every editing pass in a latent-diffusion graph (img2img, each inpaint pass) encodes the current
image and decodes the result. With the plain encoder, D(E(x)) != x and the error compounds over
generations; exact encoding picks z with D(z) ~= x, so a chain of passes stays close to the
original. `drift` runs such chains side by side with any encode functions (pure torch).

    >>> import torch
    >>> from core import Codec, drift
    >>> codec = Codec(encode=lambda x: 0.9 * x, decode=lambda z: z.clamp(0, 1))  # a lossy encoder
    >>> x = torch.full((1, 3, 4, 4), 0.5)
    >>> r = drift(codec, x, {"plain": codec.encode, "exact": lambda p: p}, generations=2)
    >>> r.psnr["exact"][-1].item(), round(r.psnr["plain"][-1].item(), 2)
    (inf, 20.45)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .codec import Codec
from .metrics import per_sample_mse, psnr_from_mse

Tensor = torch.Tensor


@dataclass
class DriftResult:
    """psnr[name]: (generations + 1, B) PSNR of generation g against the original (row 0 = +inf,
    the original itself); finals[name]: the last generation (B, 3, H, W) fp32 on the CPU;
    history[name]: every generation 1..G when kept (keep_all), else empty."""

    generations: int
    psnr: dict[str, Tensor]
    finals: dict[str, Tensor]
    history: dict[str, list[Tensor]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def report(self) -> str:
        names = list(self.psnr)
        batch = next(iter(self.psnr.values())).shape[1]
        lines = [f"Round-trip drift: {self.generations} generation(s) of encode -> decode, PSNR vs the "
                 f"original (dB)"]
        for b in range(batch):
            if batch > 1:
                lines.append(f"image {b + 1}:")
            lines.append("  gen  " + "  ".join(f"{n:>10}" for n in names))
            for g in range(1, self.generations + 1):
                lines.append(f"  {g:>3}  " + "  ".join(f"{_db(self.psnr[n][g, b].item()):>10}" for n in names))
        last = {n: self.psnr[n][-1].mean().item() for n in names}
        lines.append("after generation {}: ".format(self.generations)
                     + ", ".join(f"{n} {_db(v)} dB" for n, v in last.items())
                     + (f" (mean over {batch} images)" if batch > 1 else ""))
        if len(names) == 2:
            a, b = names
            lines.append(f"{b} - {a}: {last[b] - last[a]:+.2f} dB")
        lines.append(", ".join(f"{n} {s:.2f} s" for n, s in self.seconds.items()))
        return "\n".join(lines)


def _db(v: float) -> str:
    return "inf" if v == math.inf else f"{v:.2f}"


def drift(codec: Codec, image: Tensor, encoders: dict[str, Callable[[Tensor], Tensor]], generations: int,
          keep_all: bool = False, callback: Optional[Callable[[str, int], None]] = None) -> DriftResult:
    """For each named encode function (pixels (B, 3, H, W) in [0, 1] -> latent), run
    x_0 = image, x_g = decode(encode(x_{g-1})) for g = 1..generations and measure PSNR(x_g, x_0).
    `callback(name, g)` runs after each generation (raise from it to cancel)."""
    if int(generations) != generations or generations < 1:
        raise ValueError(f"generations must be an integer >= 1; got {generations!r}")
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W); got shape {tuple(image.shape)}")
    if not encoders:
        raise ValueError("encoders: give at least one encode function")
    import time

    x0 = image.to(codec.device, torch.float32)
    result = DriftResult(generations=int(generations), psnr={}, finals={})
    for name, encode in encoders.items():
        start = time.perf_counter()
        rows = [torch.full((x0.shape[0],), math.inf)]
        x = x0
        kept = []
        for g in range(1, generations + 1):
            with torch.inference_mode():
                z = encode(x.to(codec.dtype))
                x = codec.decode(z.to(codec.dtype)).float().clamp(0, 1)
            rows.append(psnr_from_mse(per_sample_mse(x, x0)).cpu())
            if keep_all:
                kept.append(x.cpu())
            if callback is not None:
                callback(name, g)
        result.psnr[name] = torch.stack(rows)
        result.finals[name] = x.cpu()
        result.history[name] = kept
        result.seconds[name] = time.perf_counter() - start
    return result
