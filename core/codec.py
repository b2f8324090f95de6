"""The encoder/decoder pair the solver inverts, independent of any host application."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Tensor = torch.Tensor


@dataclass
class Codec:
    """An autoencoder as two functions on one device and dtype.

    encode: pixels (B, 3, H, W) in [0, 1] -> latent (B, C, h, w), deterministic (posterior mode).
    decode: latent -> pixels (B, 3, H, W) in [0, 1], exactly what a user would see.
    grad_decode: optional factory of a decode that autograd can differentiate (fp32, ordinary
        tensors); only the gradient baseline and hybrid need it. It usually copies the decoder, so
        it is called at most once per codec (`differentiable_decode` keeps what it built).

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
    _built_grad_decode: Optional[Callable[[Tensor], Tensor]] = field(default=None, init=False, repr=False,
                                                                     compare=False)

    def differentiable_decode(self) -> Callable[[Tensor], Tensor]:
        """The differentiable decode, built on first use and kept (hybrid's memory estimate and its
        gradient steps share one decoder copy)."""
        if self.grad_decode is None:
            raise ValueError(
                "method 'gradient' needs a differentiable decoder, and this codec has none: "
                "pass Codec(grad_decode=...) or use a gradient-free method."
            )
        if self._built_grad_decode is None:
            self._built_grad_decode = self.grad_decode()
        return self._built_grad_decode
