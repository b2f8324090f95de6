"""The encoder/decoder pair the solver inverts, independent of any host application."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Tensor = torch.Tensor


@dataclass
class Codec:
    """An autoencoder as two functions on one device and dtype.

    encode: pixels (B, 3, H, W) in [0, 1] -> latent (B, C, h, w), deterministic (posterior mode).
    decode: latent -> pixels (B, 3, H, W) in [0, 1], exactly what a user would see.
    grad_decode: optional decode that autograd can differentiate (fp32, ordinary tensors); only the
        gradient-based baseline needs it. Build it lazily: it usually means a copy of the decoder.

    Example:
        >>> import torch
        >>> from core import Codec
        >>> down = torch.nn.AvgPool2d(8); up = torch.nn.Upsample(scale_factor=8)
        >>> codec = Codec(encode=down, decode=lambda z: up(z).clamp(0, 1))
        >>> codec.decode(codec.encode(torch.rand(1, 3, 16, 16))).shape
        torch.Size([1, 3, 16, 16])
    """

    encode: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor], Tensor]
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    grad_decode: Optional[Callable[[], Callable[[Tensor], Tensor]]] = None

    def differentiable_decode(self) -> Callable[[Tensor], Tensor]:
        if self.grad_decode is None:
            raise ValueError(
                "method 'gradient' needs a differentiable decoder, and this codec has none: "
                "pass Codec(grad_decode=...) or use a gradient-free method."
            )
        return self.grad_decode()
