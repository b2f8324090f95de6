"""Seconds to reach the best gradient baseline's 100-step PSNR (Adam 0.03 x RMS, constant), side by
side in one process, for gradient-phase variants tried for issue 12's item 3 (docs/convergence.md):

    .venv/bin/python -m bench.hybrid_probe taef2 astronaut,flat_objects 64 hybrid,hybrid@0.01,lbfgs10,and+lbfgs

`hybrid[@G]`: core's hybrid without encodes in its gradient phase (track_residual=False), switching
where Anderson gained <= G dB per iteration over 3 (default 0: no new best); until session 5 its
gradient phase was Adam from the best iterate, and `hybrid@LR` set that Adam's step;
`lbfgsH`: torch.optim.LBFGS (strong Wolfe, history H) on ||D(z) - x||^2 from E(x);
`and+lbfgs`: 30 Anderson steps, then L-BFGS from their best pixel iterate; `anderson-grad@LR`: core's
Anderson stepper on the RMSprop-preconditioned pixel gradient (memory 5, step LR x RMS(E(x))), from E(x);
`pixel-anderson@M[:RHO]` / `pixel-diis-grad@M[:LR]` / `pixel-diis-alt@M[:LR]`: DIIS on the pixel residual with
gradient-free / preconditioned-gradient / alternating directions (`pixel-diis-grad` is what core.diis does);
`and+diis@M[:LR]`: Anderson until 3 steps without a new best, then `pixel-diis-grad` from its best iterate;
`and|diis`: Anderson until 3 steps without a new best, then (unless its best reached the input's noise
floor) core's `diis` from E(x); `gn@INNER[:channel]`: Gauss-Newton with INNER CGLS steps, 8 s budget
(`:channel`: CGLS scaled per latent channel by J's column norms, estimated from one random backward pass);
`VARIANT:dct`: any variant on the latent's 2-D DCT coefficients (an orthogonal change of coordinates);
`and@K|diis`: K Anderson steps, then core's diis from
their pixel-best iterate; `hybrid-early@K`: core's hybrid restarting from the pixel-best of its first K fixed-point
iterates (0: from E(x), before session 14); `diis-jacobi[@LR]`: core's diis preconditioned by J's column norms
at E(x) (4 random backward passes) instead of RMSprop's per-entry g^2 (whose mean still sets the level);
`diis[@B2:LR]`: core's `diis` (RMSprop decay B2). Prints one line per variant (seconds and
evaluations to the baseline's PSNR) and writes /tmp/hybrid-probe-<model>.json.
"""
from __future__ import annotations

import importlib
import json
import math
import sys
import time

import torch

from .environment import boot
from .measure import load_vae, paper_pair, photo_bchw


def psnr(mse: float) -> float:
    return 10 * math.log10(1 / max(mse, 1e-20))


def timed_run(core, codec, x, **options) -> tuple[list, list]:
    """(seconds, PSNR) after every evaluation of core.invert (sync_every=1: every one is seen)."""
    ts, ps = [], []
    t0 = time.perf_counter()

    def seen(k, n, info):
        ts.append(time.perf_counter() - t0)
        ps.append(info["psnr"][0])

    r = core.invert(codec, x, callback=seen, sync_every=1, **options)
    return ts, ps, r


def lbfgs_run(codec, x, z0, steps: int, history: int = 10) -> tuple[list, list]:
    """torch.optim.LBFGS on the pixel MSE: (seconds, PSNR) at every function evaluation."""
    decode = codec.differentiable_decode()
    z = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=steps, history_size=history, line_search_fn="strong_wolfe",
                            tolerance_grad=0, tolerance_change=0)
    ts, ps = [], []
    t0 = time.perf_counter()

    def closure():
        opt.zero_grad()
        loss = (decode(z) - x).square().mean()
        loss.backward()
        ts.append(time.perf_counter() - t0)
        ps.append(psnr(loss.item()))
        return loss

    with torch.inference_mode(False), torch.enable_grad():
        opt.step(closure)
    return ts, ps


class AndersonOnGradient:
    """Anderson acceleration of the preconditioned gradient step z - lr * scale * g / sqrt(v), with v
    an RMSprop average of g^2 (a stationary-enough map for Anderson's mixing)."""

    def __init__(self, setup, steppers):
        self.anderson = steppers.Anderson(setup.z, setup.lr, 5)
        self.scale, self.v = setup.scale, None

    def step(self, z, g, active):
        self.v = g.square() if self.v is None else self.v.mul_(0.999).addcmul_(g, g, value=0.001)
        self.anderson.step(z, g / (self.v.sqrt() + 1e-12) * self.scale, active)


def anderson_grad_run(core, codec, x, lr: float) -> tuple[list, list]:
    methods = importlib.import_module(core.__name__ + ".methods")
    steppers = importlib.import_module(core.__name__ + ".steppers")
    methods.METHOD_REGISTRY["anderson-grad"] = methods.Method(
        "gradient", lr, lambda setup: AndersonOnGradient(setup, steppers))
    try:
        ts, ps, _ = timed_run(core, codec, x, method="anderson-grad", lr=lr, track_residual=False, stall_steps=0,
                              steps=100, select="pixel")
    finally:
        del methods.METHOD_REGISTRY["anderson-grad"]
    return ts, ps


def _pixel_and_direction(codec, x, z, e0, scale, kind: str, v):
    """(pixel residual, step direction, v): the free direction E(D(z)) - E(x), or the pixel gradient
    preconditioned by an RMSprop average v of its square (times RMS(E(x)))."""
    if kind == "free":
        with torch.inference_mode():
            img = codec.decode(z).float()
            return (img - x).flatten(), (codec.encode(img) - e0).float().flatten(), v
    decode = codec.differentiable_decode()
    with torch.inference_mode(False), torch.enable_grad():
        zg = z.detach().clone().requires_grad_(True)
        img = decode(zg)
        g = torch.autograd.grad((img - x).square().sum(), zg)[0].flatten()
    v = g.square() if v is None else v.mul_(0.999).addcmul_(g, g, value=0.001)
    return (img.detach() - x).flatten(), g / (v.sqrt() + 1e-20) * scale, v


def pixel_anderson_run(codec, x, steps: int, memory: int, rho: float = 0.5, kind: str = "free",
                       reg: float = 1e-6, z0=None):
    """Anderson mixing (type II) whose coefficients minimise the *pixel* residual D(z) - x of the
    mixed iterate (DIIS with pixel error vectors) instead of the latent one. kind "free": directions
    E(D(z)) - E(x) ~ J_E (D(z) - x), GMRES-like on D(z) = x right-preconditioned by the encoder, no
    backprop; kind "grad": RMSprop-preconditioned pixel-gradient steps (DIIS-accelerated descent)."""
    ts, ps = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = x.clone()
        e0 = codec.encode(x).float()
    x, e0 = x.clone(), e0.clone()  # ordinary tensors, for autograd
    scale = e0.square().mean().sqrt()
    z, hist, prev, v = (e0 if z0 is None else z0).clone(), [], math.inf, None
    for k in range(steps + 1):
        # kind "alt": free and gradient proposals in turn, one DIIS history (any proposal can join it)
        step_kind = ("free", "grad")[k % 2] if kind == "alt" else kind
        p, s, v = _pixel_and_direction(codec, x, z, e0, scale, step_kind, v)
        if kind == "alt" and step_kind == "free":
            s = s * (0.5 / rho)  # the free step keeps its own rho 0.5
        mse = p.square().mean().item()
        ts.append(time.perf_counter() - t0)
        ps.append(psnr(mse))
        if k == steps:
            break
        if mse > prev:
            hist = hist[-1:]  # safeguard: forget all but the last point
        prev = mse
        hist = (hist + [(z.flatten().clone(), p, s)])[-(memory + 1):]
        zk, pk, sk = hist[-1]
        if len(hist) > 1:
            dz, dp, ds = (torch.stack([b[i] - a[i] for a, b in zip(hist, hist[1:])]) for i in range(3))
            gram = dp @ dp.T
            gram += reg * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(len(gram))
            gamma = torch.linalg.solve(gram, dp @ pk)
            zk, sk = zk - gamma @ dz, sk - gamma @ ds
        z = (zk - rho * sk).view_as(z)
    return ts, ps


def squared_column_norms(jt, shape, generator, probes: int = 1) -> torch.Tensor:
    """Latent-shaped estimate of J's squared column norms ||J e_i||^2 from `probes` random pixel vectors u:
    (J^T u)_i has that variance."""
    return sum(jt(torch.randn(shape, generator=generator)).square() for _ in range(probes)) / probes


def channel_scaling(jt, like: torch.Tensor, shape, generator) -> torch.Tensor:
    """1 / sqrt of J's squared column norms averaged per latent channel (one probe; the average over a
    channel's positions steadies the estimate)."""
    sq = squared_column_norms(jt, shape, generator).mean(dim=(-2, -1), keepdim=True)
    return sq.clamp_min(sq.mean() * 1e-4).rsqrt().expand_as(like)


def gauss_newton_run(codec, x, z0, budget_s: float, inner: int, fd: float = 1e-3, scaled: bool = False):
    """Gauss-Newton on ||D(z) - x||^2 (a small-residual problem in the paper protocol): each outer
    step solves J d = -(D(z) - x) by `inner` CGLS iterations, J^T u by backward passes through one kept
    graph, J v by a forward difference (one decode). Halves the step while it does not lower the error.
    `scaled`: CGLS on J S (d = S y) with S the per-channel Jacobi scaling of `channel_scaling`."""
    decode = codec.differentiable_decode()
    ts, ps = [], []
    t0 = time.perf_counter()
    z = z0.detach().clone()
    x = x.clone()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.enable_grad():
        while True:
            zg = z.detach().clone().requires_grad_(True)
            img = decode(zg)
            r = img.detach() - x
            ts.append(time.perf_counter() - t0)
            ps.append(psnr(r.square().mean().item()))
            if ts[-1] > budget_s:
                break

            def jt(u):
                return torch.autograd.grad(img, zg, grad_outputs=u, retain_graph=True)[0]

            def jv(v):
                eps = fd * z.norm() / v.norm().clamp_min(1e-30)
                with torch.no_grad():
                    return (decode(z + eps * v) - img.detach()) / eps

            scale = channel_scaling(jt, z, img.shape, generator) if scaled else torch.ones_like(z)
            y = torch.zeros_like(z)
            res = -r
            g = scale * jt(res)
            q, gam = g.clone(), g.square().sum()
            for _ in range(inner):
                t = jv(scale * q)
                a = gam / t.square().sum().clamp_min(1e-30)
                y += a * q
                res -= a * t
                g = scale * jt(res)
                gnew = g.square().sum()
                q = g + (gnew / gam) * q
                gam = gnew
            d = scale * y
            err0 = r.square().sum()
            with torch.no_grad():
                for _ in range(6):
                    if (decode(z + d) - x).square().sum() < err0:
                        break
                    d *= 0.5
            z = z + d
    return ts, ps


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix of size n."""
    k, i = torch.arange(n).float()[:, None], torch.arange(n).float()[None]
    m = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


def dct_codec(core, codec):
    """The same codec with the latent in a 2-D DCT basis (orthogonal, so norms, RMS and the problem are
    unchanged; only per-entry preconditioners such as RMSprop's now act per spatial frequency)."""
    def to_dct(z):
        return dct_matrix(z.shape[-2]).to(z) @ z @ dct_matrix(z.shape[-1]).to(z).T

    def from_dct(u):
        return dct_matrix(u.shape[-2]).to(u).T @ u @ dct_matrix(u.shape[-1]).to(u)

    differentiable = codec.differentiable_decode()
    return core.Codec(encode=lambda p: to_dct(codec.encode(p)), decode=lambda u: codec.decode(from_dct(u)),
                      dtype=codec.dtype, device=codec.device, grad_decode=lambda: lambda u: differentiable(from_dct(u)))


def diis_jacobi_run(core, codec, x, lr: float | None, probes: int = 4) -> tuple[list, list]:
    """core's diis with its preconditioner's shape from J's squared column norms at E(x) (`probes` random
    backward passes, timed with the run: E[(J^T u)^2] = ||J e_i||^2), its level from RMSprop's mean g^2."""
    diis = importlib.import_module(core.__name__ + ".diis")
    t0 = time.perf_counter()
    with torch.inference_mode():
        z0 = codec.encode(x).float()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.enable_grad():
        zg = z0.clone().requires_grad_(True)
        img = codec.differentiable_decode()(zg)

        def jt(u):
            return torch.autograd.grad(img, zg, grad_outputs=u, retain_graph=True)[0]
        shape = squared_column_norms(jt, img.shape, generator, probes).reshape(1, -1)
    shape = shape / shape.mean()
    spent = time.perf_counter() - t0

    def direction(self, g):
        self.v.mul_(diis.BETA2).addcmul_(g, g, value=1 - diis.BETA2)
        torch.where(self.fresh[:, None], g.square(), self.v, out=self.v)
        s = torch.div(g, (self.v.mean(1, keepdim=True) * shape).sqrt().clamp_min(1e-30), out=self.s)
        return s.mul_(self.scale).mul_(self.lr)

    kept, diis.PixelDIIS._direction = diis.PixelDIIS._direction, direction
    try:
        ts, ps, _ = timed_run(core, codec, x, method="diis", steps=100, stall_steps=0, track_residual=False, lr=lr)
    finally:
        diis.PixelDIIS._direction = kept
    return [t + spent for t in ts], ps


def variant_curve(core, codec, x, variant: str) -> tuple[list, list]:
    if variant.endswith(":dct"):  # any variant, on the latent's DCT coefficients
        return variant_curve(core, dct_codec(core, codec), x, variant.removesuffix(":dct"))
    if variant.startswith("gn@"):  # gn@INNER[:channel]
        inner, _, scaling = variant.split("@")[1].partition(":")
        with torch.inference_mode():
            z0 = codec.encode(x).float()
        return gauss_newton_run(codec, x, z0.clone(), 8.0, int(inner), scaled=scaling == "channel")
    if variant.startswith(("pixel-anderson", "pixel-diis-grad", "pixel-diis-alt")):
        m, _, rho = (variant.split("@")[1] if "@" in variant else "5").partition(":")
        kind = {"pixel-anderson": "free", "pixel-diis-grad": "grad"}.get(variant.split("@")[0], "alt")
        return pixel_anderson_run(codec, x, 100, int(m), float(rho or (0.5 if kind == "free" else 0.03)), kind)
    if variant.startswith("and+diis@"):  # Anderson until it stalls 3 steps, then pixel-diis-grad from its best
        m, _, lr = variant.split("@")[1].partition(":")
        ts0, ps0, r = timed_run(core, codec, x, method="anderson", steps=100, select="pixel", stall_steps=3)
        with torch.inference_mode():
            z0 = r.latent.float().clone()
        ts, ps = pixel_anderson_run(codec, x, 101 - len(ps0), int(m), float(lr or 0.03), "grad", z0=z0.clone())
        return ts0 + [t + r.seconds for t in ts], ps0 + ps
    if variant == "and|diis":  # Anderson until it stalls 3 steps; below the noise floor, core's diis from E(x)
        twin = importlib.import_module(core.__name__ + ".twin")
        ts0, ps0, r = timed_run(core, codec, x, method="anderson", steps=100, select="pixel", stall_steps=3)
        if max(ps0) >= float(twin.noise_floor_psnr(x)[0]) - twin.FLOOR_MARGIN_DB:
            return ts0, ps0
        ts, ps, _ = timed_run(core, codec, x, method="diis", steps=101 - len(ps0), stall_steps=0, track_residual=False)
        return ts0 + [t + ts0[-1] for t in ts], ps0 + ps
    if variant.startswith("and@"):  # and@K|diis: K Anderson steps, then core's diis from their pixel-best iterate
        k = int(variant.split("@")[1].split("|")[0])
        ts0, ps0, r = timed_run(core, codec, x, method="anderson", steps=k, select="pixel", stall_steps=0, rival="")
        with torch.inference_mode():
            z0 = r.latent.float().clone()
        ts, ps, _ = timed_run(core, codec, x, method="diis", steps=100 - k, stall_steps=0, track_residual=False,
                              target_latent=z0)
        return ts0 + [t + ts0[-1] for t in ts[1:]], ps0 + ps[1:]
    if variant.startswith("diis-jacobi"):  # diis-jacobi[@LR]
        return diis_jacobi_run(core, codec, x, float(variant.split("@")[1]) if "@" in variant else None)
    if variant.startswith("diis"):  # core's method under the baseline's protocol; diis@B2:LR patches its decay
        diis = importlib.import_module(core.__name__ + ".diis")
        b2, _, lr = (variant.split("@")[1] if "@" in variant else "").partition(":")
        kept, diis.BETA2 = diis.BETA2, float(b2 or diis.BETA2)
        try:
            ts, ps, _ = timed_run(core, codec, x, method="diis", steps=100, stall_steps=0, track_residual=False,
                                  lr=float(lr) if lr else None)
        finally:
            diis.BETA2 = kept
        return ts, ps
    if variant.startswith("anderson-grad@"):
        return anderson_grad_run(core, codec, x, float(variant.split("@")[1]))
    if variant.startswith("hybrid"):  # core's, under the baseline's protocol; hybrid@G patches MIN_GAIN_DB,
        hybrid = importlib.import_module(core.__name__ + ".hybrid")  # hybrid-early@K its EARLY_STEPS
        name = "EARLY_STEPS" if variant.startswith("hybrid-early@") else "MIN_GAIN_DB"
        kept = getattr(hybrid, name)
        setattr(hybrid, name, type(kept)(variant.split("@")[1]) if "@" in variant else kept)
        try:
            ts, ps, _ = timed_run(core, codec, x, method="hybrid", steps=100, stall_steps=0, track_residual=False)
        finally:
            setattr(hybrid, name, kept)
        return ts, ps
    if variant.startswith("lbfgs"):
        with torch.inference_mode():
            z0 = codec.encode(x).float()
        return lbfgs_run(codec, x, z0, 100, int(variant[5:] or 10))
    if variant == "and+lbfgs":
        _, _, r = timed_run(core, codec, x, method="anderson", steps=30, select="pixel")
        ts, ps = lbfgs_run(codec, x, r.latent.clone(), 80)
        return [t + r.seconds for t in ts], ps
    raise ValueError(f"unknown variant {variant!r}")


def main(argv=None) -> int:
    model, images, size, variants = (argv or sys.argv[1:])[:4]
    ctx = boot(2)
    codec = ctx.adapter.vae_codec(load_vae(model), "fp32", (1, 3, int(size), int(size)))
    out = {}
    for name in images.split(","):
        x, _ = paper_pair(codec, photo_bchw(name, int(size)))
        ts, ps, _ = timed_run(ctx.core, codec, x, method="gradient", lr=0.03, schedule=False, track_residual=False,
                              stall_steps=0, steps=100)
        target, t_base = ps[-1], ts[-1]
        row = {"baseline": dict(psnr=target, seconds=t_base)}
        for v in variants.split(","):
            ts2, ps2 = variant_curve(ctx.core, codec, x, v)
            hit = next((t for t, p in zip(ts2, ps2) if p >= target), None)
            k = next((i for i, p in enumerate(ps2) if p >= target), None)
            row[v] = dict(final=max(ps2), seconds=ts2[-1], seconds_to_baseline=hit, evaluations_to_baseline=k,
                          ratio=None if hit is None else round(hit / t_base, 3))
            print(name, v, f"baseline {target:.2f} dB in {t_base:.1f} s", row[v], flush=True)
        out[name] = row
    with open(f"/tmp/hybrid-probe-{model}.json", "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
