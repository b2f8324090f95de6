"""Issue 12 item 2 probe: does handling the round trip's expanding directions fix the kl-f8 misses?

Oracle version: the full round-trip Jacobian J = d E(D(z)) / dz at z0 = E(x) (central differences), its
eigenvalues with Re < -0.01 and a real orthonormal basis V of their eigenvectors; then a fixed-point run
whose residual g is replaced by g' = (I - V V^T) g + (1/rho) V T^-1 V^T g, T = V^T J V (recursive projection
method, Shroff & Keller 1993: Newton on the unstable subspace, the plain step on its complement).

    .venv/bin/python -m bench.unstable_probe kl_f8_small texture,stars,flat_noise 64 100

Prints, per image: the eigenvalues below -0.01, how many are below 0.02 ... 0.2, what 5 / 10 / 20 Arnoldi steps
from g0 find, anderson with the steps projected off the eigenvectors below tau = -0.01, 0.05, 0.1 (from the full J
and from 20 Arnoldi steps), then forward and anderson plain, with the Newton step on span V, and projected.
A fifth argument skips the last block. Minutes per image at 64 px (256 latent entries).
"""
from __future__ import annotations

import sys
from dataclasses import replace

import torch

from .environment import boot
from .measure import load_vae, paper_pair, photo_bchw
from .twin_probe import nmse


def roundtrip_jacobian(codec, z0, eps=1e-2, chunk=32):
    n = z0.numel()
    cols = []
    with torch.inference_mode():
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(n, start + chunk))
            zb = z0.reshape(1, -1).repeat(len(idx), 1)
            zp, zm = zb.clone(), zb.clone()
            zp[torch.arange(len(idx)), idx] += eps
            zm[torch.arange(len(idx)), idx] -= eps
            shp = (len(idx), *z0.shape[1:])
            fp = codec.encode(codec.decode(zp.reshape(shp))).float().reshape(len(idx), -1)
            fm = codec.encode(codec.decode(zm.reshape(shp))).float().reshape(len(idx), -1)
            cols.append((fp - fm) / (2 * eps))
    return torch.cat(cols).T.double()


def unstable_basis(J, thresh=-0.01):
    ev, vec = torch.linalg.eig(J)
    sel = ev.real < thresh
    if not sel.any():
        return None, ev
    parts = []
    for i in torch.nonzero(sel).flatten().tolist():
        parts.append(vec[:, i].real)
        if abs(ev[i].imag) > 1e-9:
            parts.append(vec[:, i].imag)
    V, _ = torch.linalg.qr(torch.stack(parts, 1))
    # drop near-dependent columns
    return V, ev


def arnoldi_unstable(matvec, v0, m, thresh=-0.01):
    """Ritz vectors (real orthonormal basis) of the Ritz values with Re < thresh after m Arnoldi steps."""
    n = v0.numel()
    Q = torch.zeros(n, m + 1, dtype=torch.float64)
    H = torch.zeros(m + 1, m, dtype=torch.float64)
    Q[:, 0] = v0 / v0.norm()
    for j in range(m):
        w = matvec(Q[:, j])
        for _ in range(2):
            h = Q[:, :j + 1].T @ w
            w = w - Q[:, :j + 1] @ h
            H[:j + 1, j] += h
        H[j + 1, j] = w.norm()
        Q[:, j + 1] = w / H[j + 1, j]
    ev, y = torch.linalg.eig(H[:m, :m])
    sel = ev.real < thresh
    if not sel.any():
        return None, ev
    parts = []
    for i in torch.nonzero(sel).flatten().tolist():
        u = Q[:, :m].to(y.dtype) @ y[:, i]
        parts.append(u.real)
        if abs(ev[i].imag) > 1e-9:
            parts.append(u.imag)
    V, _ = torch.linalg.qr(torch.stack(parts, 1))
    return V, ev


class Deflated:
    def __init__(self, inner, V, T, rho, mode="newton"):
        self.inner, self.V, self.Tinv, self.rho = inner, V.float(), torch.linalg.inv(T).float(), rho
        self.mode = mode

    def step(self, z, g, active):
        gf = g.reshape(1, -1)
        c = gf @ self.V  # (1, p)
        newton = (c @ self.Tinv.T) @ self.V.T / self.rho if self.mode == "newton" else 0 * gf
        g2 = (gf - c @ self.V.T + newton).reshape(g.shape)
        self.inner.step(z, g2, active)


def run(core, codec, x, z_true, method, steps, V=None, T=None, mode="newton"):
    zs = []

    def rec(z):
        zs.append(z.detach().clone())
        return codec.decode(z)

    name = method
    if V is not None:
        base = core.methods.METHOD_REGISTRY[method]

        def build(s, base=base):
            return Deflated(base.build(s), V, T, s.lr, mode)
        name = method + "-" + mode
        core.methods.METHOD_REGISTRY[name] = core.methods.Method("fixed_point", base.default_lr, build)
    r = core.invert(replace(codec, decode=rec), x, core.InversionOptions(method=name, steps=steps, stall_steps=0,
                                                                         select="pixel"))
    nm = [nmse(z, z_true) for z in zs]
    best = r.samples[0].best_iteration
    return nm, r.trace_psnr[:, 0].tolist(), best


def main(argv=None) -> int:
    model, names, size, steps = (argv or sys.argv[1:])[:4]
    size, steps = int(size), int(steps)
    ctx = boot(1)
    import importlib
    ctx.core.methods = importlib.import_module(ctx.core.__name__ + ".methods")
    codec = ctx.adapter.vae_codec(load_vae(model), "fp32", (1, 3, size, size))
    for n in names.split(","):
        x, z_gt = paper_pair(codec, photo_bchw(n, size))
        x, z_gt = x.clone(), z_gt.clone()
        with torch.inference_mode():
            z0 = codec.encode(x).float()
        J = roundtrip_jacobian(codec, z0)
        V, ev = unstable_basis(J)
        print(f"{model} {n}: enc {nmse(z0, z_gt):.2f}; eig min Re {ev.real.min():.3f}; "
              f"unstable {0 if V is None else V.shape[1]}: {sorted(ev.real[ev.real < -0.01].tolist())[:6]}", flush=True)
        with torch.inference_mode():
            g0 = (codec.encode(codec.decode(z0)).float() - z0).reshape(-1).double()
        print("  counts Re<0.02/0.05/0.1/0.2:", [(ev.real < t).sum().item() for t in (0.02, 0.05, 0.1, 0.2)],
              flush=True)
        for m in (5, 10, 20):  # what core.unstable's Arnoldi (from g0) sees of it
            Va, eva = arnoldi_unstable(lambda v: J @ v, g0, m)
            print(f"  arnoldi m={m}: ritz min Re {eva.real.min():.3f}, expanding {0 if Va is None else Va.shape[1]}"
                  + ("" if V is None or Va is None else f", overlap {torch.linalg.svdvals(V.T @ Va).max():.3f}"),
                  flush=True)
        for tau in (-0.01, 0.05, 0.1):
            for src in ("full", "arnoldi20"):
                if src == "full":
                    Va, _ = unstable_basis(J, tau)
                else:
                    Va, _ = arnoldi_unstable(lambda v: J @ v, g0, 20, tau)
                if Va is None:
                    print(f"  tau {tau} {src}: none")
                    continue
                nm, ps, best = run(ctx.core, codec, x, z_gt, "anderson", steps, Va, Va.T @ J @ Va, "proj")
                kmin = min(range(len(nm)), key=nm.__getitem__)
                print(f"  tau {tau} {src} p={Va.shape[1]} pixbest@{best} nmse {nm[best]:.2f} psnr {ps[best]:.2f} | "
                      f"min nmse {nm[kmin]:.2f}@{kmin} | nmse@10,30,100 {nm[10]:.2f} {nm[30]:.2f} {nm[-1]:.2f}",
                      flush=True)
        T = None if V is None else V.T @ J @ V
        for meth in (() if len(sys.argv) > 5 else ("forward", "anderson")):
            for tag, vv in (("plain", None), ("newton", V), ("proj", V)):
                if tag != "plain" and V is None:
                    continue
                nm, ps, best = run(ctx.core, codec, x, z_gt, meth, steps, vv, T, tag)
                kmin = min(range(len(nm)), key=nm.__getitem__)
                print(f"  {meth:8s} {tag:5s} pixbest@{best} nmse {nm[best]:.2f} psnr {ps[best]:.2f} | min nmse "
                      f"{nm[kmin]:.2f}@{kmin} | nmse@10,30,100 {nm[min(10, len(nm)-1)]:.2f} "
                      f"{nm[min(30, len(nm)-1)]:.2f} {nm[-1]:.2f} | psnr max {max(ps):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
