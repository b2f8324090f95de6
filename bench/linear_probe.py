"""Issue 12, item 3: what the decoder's and encoder's Jacobians at E(x) say about the hybrid's target.

For each VAE x image (paper protocol, fp32): the full decoder Jacobian J_D at z0 = E(x) (forward
differences, one column per latent entry) and the encoder's J_E at x (backward passes), then

- the conditioning of J_D, plain, with the per-entry (Jacobi) scaling a diagonal preconditioner
  such as RMSprop's approximates, and with the encoder's (J_E J_E^T)^(1/2), which would be
  (J_D^T J_D)^(-1/2) if J_E were J_D's pseudo-inverse: sigma_max / sigma_min;
- the linearised round trip J_E J_D, whose eigenvalues govern the fixed-point step z -= rho (E(D(z)) - E(x))
  near z0: the share with real part < -0.01 (directions along which every step size expands), the lowest
  real part and the largest imaginary part;
- a check of J_D: the relative difference of J_D^T r0 from autograd's gradient;
- the linear model r0 + J_D d of the pixel residual: its least-squares optimum, Adam (0.03 x RMS(E(x)),
  constant, 100 steps) on it, and the iterations CGLS (the optimal Krylov method over gradient products,
  plain and Jacobi-scaled) needs to match that Adam; beside the real Adam's 100-step PSNR.

    .venv/bin/python -m bench.linear_probe taef2,kl_f8_small astronaut,flat_objects,texture 64

Minutes per TAEF2 image at 64 px (2048 latent entries); kl_f8_small's 256 take seconds. Prints a markdown table.
"""
from __future__ import annotations

import copy
import math
import sys

import torch

from .environment import boot
from .hybrid_probe import timed_run
from .measure import load_vae, paper_pair, photo_bchw
from .table import markdown_table


def psnr_of(residual: torch.Tensor) -> float:
    return 10 * math.log10(1 / residual.square().mean().item())


def decoder_jacobian(decode, z0: torch.Tensor, eps: float = 1e-3, chunk: int = 128) -> torch.Tensor:
    """(pixels, latents), by forward differences over batches of unit perturbations."""
    n, cols = z0.numel(), []
    with torch.no_grad():
        base = decode(z0)
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(n, start + chunk))
            zb = z0.reshape(1, -1).repeat(len(idx), 1)
            zb[torch.arange(len(idx)), idx] += eps
            cols.append(((decode(zb.reshape(len(idx), *z0.shape[1:])) - base) / eps).reshape(len(idx), -1))
    return torch.cat(cols).T.double()


def encoder_jacobian(encode, x: torch.Tensor, n_latent: int, chunk: int = 64) -> torch.Tensor:
    """(latents, pixels): one backward pass per latent entry, `chunk` copies of x at a time."""
    rows = []
    with torch.inference_mode(False), torch.enable_grad():
        for start in range(0, n_latent, chunk):
            k = min(n_latent, start + chunk) - start
            xb = x.detach().clone().repeat(k, 1, 1, 1).requires_grad_(True)
            picked = encode(xb).reshape(k, -1)[torch.arange(k), torch.arange(start, start + k)]
            rows.append(torch.autograd.grad(picked.sum(), xb)[0].reshape(k, -1))
    return torch.cat(rows).double()


def symmetric_sqrt(m: torch.Tensor) -> torch.Tensor:
    """M^(1/2) of a symmetric positive semi-definite M (eigenvalues floored at 1e-8 of the largest)."""
    e, v = torch.linalg.eigh(m)
    return v @ torch.diag(e.clamp_min(e.max() * 1e-8).sqrt()) @ v.T


def adam_on_linear_model(J, r0, lr: float, steps: int = 100) -> float:
    """PSNR of Adam (the bench's gradient baseline settings) on ||r0 + J d||^2 after `steps`."""
    d, m, v = (torch.zeros(J.shape[1], dtype=J.dtype) for _ in range(3))
    for k in range(1, steps + 1):
        g = 2 * J.T @ (r0 + J @ d) / r0.numel()
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        d = d - lr * (m / (1 - 0.9 ** k)) / ((v / (1 - 0.999 ** k)).sqrt() + 1e-8)
    return psnr_of(r0 + J @ d)


def cgls_psnrs(A, r0, steps: int) -> list:
    """PSNR of r0 + A y after each CGLS iteration from y = 0."""
    y, r = torch.zeros(A.shape[1], dtype=A.dtype), -r0.clone()
    s = A.T @ r
    p, gamma, out = s.clone(), s @ s, [psnr_of(r0)]
    for _ in range(steps):
        q = A @ p
        a = gamma / (q @ q)
        y, r = y + a * p, r - a * q
        s = A.T @ r
        gamma, p = s @ s, s + ((s @ s) / gamma) * p
        out.append(psnr_of(r))
    return out


def probe(ctx, vae, codec, image: str, size: int) -> dict:
    x, _ = paper_pair(codec, photo_bchw(image, size))
    with torch.no_grad():
        z0 = codec.encode(x).float()
        r0 = (codec.decode(z0) - x).reshape(-1).double()
    decode = codec.differentiable_decode()
    jd = decoder_jacobian(decode, z0)
    with torch.inference_mode(False), torch.enable_grad():
        zg = z0.clone().requires_grad_(True)
        grad = torch.autograd.grad(decode(zg), zg, grad_outputs=r0.float().view_as(x))[0].reshape(-1).double()
    model32 = copy.deepcopy(vae.first_stage_model).float().requires_grad_(False)
    je = encoder_jacobian(lambda p: model32.encode(vae.process_input(p)), x, z0.numel())
    jacobi = jd / jd.square().sum(0).sqrt()
    sv, sv_jacobi = torch.linalg.svdvals(jd), torch.linalg.svdvals(jacobi)
    sv_encoder = torch.linalg.svdvals(jd @ symmetric_sqrt(je @ je.T))
    eig = torch.linalg.eigvals(je @ jd)
    adam_lin = adam_on_linear_model(jd, r0, 0.03 * z0.square().mean().sqrt().item())

    def first(curve):
        return next((k for k, p in enumerate(curve) if p >= adam_lin), None)
    _, real_adam, _ = timed_run(ctx.core, codec, x, method="gradient", lr=0.03, schedule=False,
                                track_residual=False, stall_steps=0, steps=100)
    return {
        "latent entries": z0.numel(),
        "J_D check": ((jd.T @ r0 - grad).norm() / grad.norm()).item(),
        "cond J_D": (sv[0] / sv[-1]).item(), "cond Jacobi-scaled": (sv_jacobi[0] / sv_jacobi[-1]).item(),
        "cond encoder-scaled": (sv_encoder[0] / sv_encoder[-1]).item(),
        "share Re(eig J_E J_D) < -0.01": (eig.real < -0.01).double().mean().item(),
        "min Re": eig.real.min().item(), "max abs Im": eig.imag.abs().max().item(),
        "PSNR E(x)": psnr_of(r0), "linear LS optimum": psnr_of(r0 - jd @ torch.linalg.lstsq(jd, r0).solution),
        "linear Adam-100": adam_lin,
        "CGLS iterations to it, plain": first(cgls_psnrs(jd, r0, 100)),
        "CGLS iterations to it, Jacobi": first(cgls_psnrs(jacobi, r0, 100)),
        "real Adam-100": real_adam[-1],
    }


def main(argv=None) -> int:
    models, images, size = (argv or sys.argv[1:])[:3]
    ctx, header, cells = boot(2), None, []
    for model in models.split(","):
        vae = load_vae(model)
        codec = ctx.adapter.vae_codec(vae, "fp32", (1, 3, int(size), int(size)))
        for image in images.split(","):
            row = probe(ctx, vae, codec, image, int(size))
            header = ["VAE", "image", *row]
            cells.append([model, image, *("never" if v is None else f"{v:.3g}" if isinstance(v, float) else v
                                          for v in row.values())])
            print(markdown_table(header, cells[-1:])[-1], flush=True)
    print("\n".join(markdown_table(header, cells)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
