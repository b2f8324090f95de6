"""How good is a latent? Reconstruction metrics, the paper's assumption check, trace fingerprints.

Everything here is pure PyTorch and works on any (B, ...) latent, whichever encoder produced it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .codec import Codec
from .metrics import nmse_db, per_sample_mse, per_sample_norm, psnr_from_mse, ratio_db

Tensor = torch.Tensor


def cocoercivity(iterates: Sequence[Tensor], residuals: Sequence[Tensor], z_star: Tensor,
                 last: Optional[Sequence[int]] = None) -> list[dict]:
    """Empirical check of the paper's convergence assumption along a solver's trajectory.

    The forward step z <- z - rho T(z), T(z) = E(D(z)) - E(x), converges when T is beta-cocoercive
    around its zero z* (Hong et al. 2024, Assumption 1):  <T z_k, z_k - z*> >= beta ||T z_k||^2.
    For each recorded iterate this computes beta_k = <T z_k, z_k - z*> / ||T z_k||^2 per sample,
    with z* the solver's best iterate (the zero is unknown; the best iterate is its estimate).
    Iterates that coincide with z* carry no information and are skipped.

    Returns per sample: `beta_min` (the smallest beta seen: the largest beta the assumption can
    hold with, if positive), `beta_median`, `share_positive` (the share of steps with beta_k > 0,
    i.e. that satisfy the assumption for some beta > 0; a cocoercive T gives 1.0) and `points`.

    `iterates[k]`, `residuals[k]`: (B, ...) tensors; `last[b]`: the last index valid for sample b.

        >>> import torch
        >>> a = torch.diag(torch.tensor([1.0, 2.0, 4.0]))   # T(z) = A (z - z*): beta = 1 / 4
        >>> zs = [torch.randn(1, 3) for _ in range(50)]
        >>> ts = [z @ a for z in zs]
        >>> r = cocoercivity(zs, ts, torch.zeros(1, 3))[0]
        >>> r["beta_min"] >= 0.25 - 1e-6, r["share_positive"]
        (True, 1.0)
    """
    if len(iterates) != len(residuals):
        raise ValueError(f"got {len(iterates)} iterates but {len(residuals)} residuals")
    batch = z_star.shape[0]
    zs = z_star.float().flatten(1)
    out = []
    for b in range(batch):
        stop = len(iterates) - 1 if last is None else min(int(last[b]), len(iterates) - 1)
        betas = []
        for k in range(stop + 1):
            t = residuals[k][b].float().flatten()
            d = iterates[k][b].float().flatten() - zs[b]
            tt = float(t @ t)
            if tt <= 0 or float(d @ d) <= 1e-12 * max(float(zs[b] @ zs[b]), 1e-30):
                continue
            betas.append(float(t @ d) / tt)
        if betas:
            srt = sorted(betas)
            out.append(dict(beta_min=srt[0], beta_median=srt[len(srt) // 2],
                            share_positive=sum(v > 0 for v in betas) / len(betas), points=len(betas)))
        else:
            out.append(dict(beta_min=None, beta_median=None, share_positive=None, points=0))
    return out


def fingerprint(latent: Tensor) -> list:
    """A cheap identity check for a latent: shape, sum and sum of squares (fp64).

    A solver trace attached to a latent is only trusted while the latent still has this fingerprint,
    so a trace never describes a latent that some other node has changed.
    """
    flat = latent.detach().double().flatten()
    return [list(latent.shape), float(flat.sum()), float(flat.pow(2).sum())]


def same_fingerprint(a: list, b: list, rtol: float = 1e-6) -> bool:
    if a[0] != b[0]:
        return False
    return all(math.isclose(x, y, rel_tol=rtol, abs_tol=rtol) for x, y in zip(a[1:], b[1:]))


def reconstruction(codec: Codec, image: Tensor, latent: Tensor, reference: Optional[Tensor] = None,
                   baseline: bool = True) -> dict:
    """Per-sample quality of `latent` as an encoding of `image` (B, 3, H, W) in [0, 1].

    Returns {"samples": [...], "error_map": (B, H, W), "error_map_encoder": (B, H, W) or None}
    where each sample has `psnr` (D(z) vs x, dB), `max_abs_error`, `residual_db`
    (||E(D(z)) - E(x)|| / ||E(x)||) and, with a reference latent, `nmse_db_reference`
    (the paper's metric); with `baseline`, the same for the plain encoder's E(x) (`*_encoder`)
    and `gain_db` = psnr - psnr_encoder. Error maps are |D(.) - x| averaged over RGB.

        >>> import torch
        >>> from core import Codec
        >>> codec = Codec(encode=lambda x: 0.9 * x, decode=lambda z: z)
        >>> x = torch.rand(1, 3, 4, 4)
        >>> r = reconstruction(codec, x, x.clone())
        >>> r["samples"][0]["gain_db"] > 10
        True
    """
    with torch.inference_mode():
        device, dtype = codec.device, codec.dtype
        x = image.to(device=device, dtype=torch.float32)
        z = latent.to(device=device, dtype=torch.float32)
        e0 = codec.encode(x.to(dtype)).float()
        e0_norm = per_sample_norm(e0).clamp_min(1e-12)

        def measure(w: Tensor) -> tuple[dict, Tensor]:
            xw = codec.decode(w.to(dtype)).float()
            diff = (xw - x).abs()
            res = ratio_db(per_sample_norm(codec.encode(xw.to(dtype)).float() - e0), e0_norm)
            m = dict(psnr=psnr_from_mse(per_sample_mse(xw, x)).tolist(),
                     max_abs_error=diff.flatten(1).amax(1).tolist(), residual_db=res.tolist())
            if reference is not None:
                m["nmse_db_reference"] = nmse_db(w, reference.to(device=device, dtype=torch.float32)).tolist()
            return m, diff.mean(1).cpu()

        ours, err_map = measure(z)
        enc, enc_map = measure(e0) if baseline else (None, None)
    samples = []
    for b in range(z.shape[0]):
        s = {k: v[b] for k, v in ours.items()}
        if enc is not None:
            s.update({f"{k}_encoder": v[b] for k, v in enc.items()})
            s["gain_db"] = s["psnr"] - s["psnr_encoder"]
        samples.append(s)
    return {"samples": samples, "error_map": err_map, "error_map_encoder": enc_map}
