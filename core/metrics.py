"""Per-sample error measures shared by the solver, the nodes and the benchmark."""
from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per batch item, in fp32: (B, ...) x (B, ...) -> (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def per_sample_norm(a: Tensor) -> Tensor:
    """Euclidean norm per batch item, in fp32: (B, ...) -> (B,)."""
    return a.float().flatten(1).norm(dim=1)


def psnr_from_mse(mse: Tensor | float, peak: float = 1.0) -> Tensor | float:
    """PSNR in dB for signals in [0, peak]; a perfect match gives +inf.

    >>> round(psnr_from_mse(1e-3), 1)
    30.0
    """
    if isinstance(mse, Tensor):
        return 10.0 * torch.log10(peak**2 / mse.clamp_min(0).double()).float()
    return math.inf if mse <= 0 else 10.0 * math.log10(peak**2 / mse)


def ratio_db(num: Tensor, den: Tensor) -> Tensor:
    """20 log10(num / den) for norms: the relative residual ||E(D(z)) - E(x)|| / ||E(x)|| in dB."""
    return 20.0 * torch.log10(num.double() / den.double()).float()


def nmse_db(z: Tensor, z_ref: Tensor) -> Tensor:
    """The paper's latent error: 10 log10(||z - z_ref||^2 / ||z_ref||^2) per sample."""
    return ratio_db(per_sample_norm(z.float() - z_ref.float()), per_sample_norm(z_ref))
