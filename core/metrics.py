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


def per_sample_weighted_mse(a: Tensor, b: Tensor, weight: Tensor | None) -> Tensor:
    """MSE per batch item with per-pixel weights (B or 1, 1, H, W) in [0, 1] on (B, C, H, W) images:
    sum(w (a - b)^2) / sum(w) over pixels and channels. A sample whose weights are all zero gets
    the plain MSE (no region to weight). weight=None is per_sample_mse. Differentiable in `a`."""
    return PixelError(b, weight, in_place=False)(a)


def region_error(a: Tensor, b: Tensor, region: Tensor | None = None) -> list[dict]:
    """PSNR (dB, +inf when identical) and max absolute error of a vs b (B, C, H, W) per sample,
    over the pixels where `region` (B or 1, 1, H, W) > 0.5 (all pixels when None). A sample with
    an empty region gets None values and pixels = 0."""
    diff = (a.float() - b.float()).abs()
    if region is None:
        region = torch.ones_like(diff[:, :1])
    sel = (region.float().to(diff.device) > 0.5).expand(diff.shape[0], 1, *diff.shape[2:])
    out = []
    for i in range(diff.shape[0]):
        d = diff[i][:, sel[i, 0]]
        if d.numel() == 0:
            out.append({"psnr": None, "max_abs": None, "pixels": 0})
            continue
        out.append({"psnr": float(psnr_from_mse(float(d.pow(2).mean()))), "max_abs": float(d.max()),
                    "pixels": int(sel[i, 0].sum())})
    return out


def check_decoded_size(decoded: Tensor, image: Tensor) -> None:
    """A clear error where the decoder's output is not the image's size: the image's sides are not multiples of the
    VAE's latent cell, so E(x) decodes to another size and no latent can reproduce x.

    >>> check_decoded_size(torch.zeros(1, 3, 32, 40), torch.zeros(1, 3, 30, 33))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: image is 33x30 px, but this VAE decodes its latent to 40x32 px: crop or resize the image so that ...
    """
    def size(t: Tensor) -> str:  # W x H, as image sizes are named
        return "x".join(str(n) for n in reversed(t.shape[2:]))

    if decoded.shape[2:] != image.shape[2:]:
        raise ValueError(f"image is {size(image)} px, but this VAE decodes its latent to {size(decoded)} px: crop or "
                         "resize the image so that its sides are multiples of the VAE's latent cell (8 px for SD, "
                         "SDXL, SD3 and FLUX; exact_encode.adapters.images.crop_to_cell crops as ComfyUI's VAE Encode "
                         "does)")


class PixelError:
    """per_sample_weighted_mse against a fixed target `x`. With in_place (the solver's loop, every
    iteration) it computes in a buffer allocated once, so no image-sized temporaries; that form is
    not for autograd, which the other one (per_sample_weighted_mse) serves."""

    def __init__(self, x: Tensor, weight: Tensor | None = None, in_place: bool = True):
        self.x = x.float()
        self.buf = torch.empty_like(self.x) if in_place else None
        self.w = None
        if weight is not None:
            self.w = weight.float().to(x.device).expand(x.shape[0], 1, *x.shape[2:])
            self.total = self.w.flatten(1).sum(1) * x.shape[1]

    def __call__(self, a: Tensor) -> Tensor:
        if self.buf is None:
            sq = (a.float() - self.x).square()
        else:
            sq = torch.sub(a, self.x, out=self.buf).square_()
        plain = sq.flatten(1).mean(1)
        if self.w is None:
            return plain
        sq = sq * self.w if self.buf is None else sq.mul_(self.w)
        weighted = sq.flatten(1).sum(1) / self.total.clamp_min(1e-12)
        return torch.where(self.total > 0, weighted, plain)

    def residual(self, a: Tensor) -> Tensor:
        """sqrt(w) (a - x), a new tensor: its squared norm is the weighted error up to a per-sample
        factor; a sample whose weights are all zero gets the plain difference, as the error does."""
        diff = a.float() - self.x
        if self.w is None:
            return diff
        return torch.where((self.total > 0).view(-1, 1, 1, 1), diff * self.w.sqrt(), diff)
