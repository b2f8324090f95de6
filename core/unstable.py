"""The round trip's expanding directions at the start, and a fixed-point step that does not move along them.

Near z0 = E(x) a fixed-point step z -= rho (E(D(z)) - E(x)) multiplies each eigen-component of the
linearised round trip J = J_E J_D by 1 - rho lambda, whose modulus exceeds 1 for every step size where
Re lambda < 0: along those directions the iteration expands (docs/convergence.md, "The Jacobians at E(x)";
kl-f8 texture and stars have one and two such eigenvalues at 64 px). The recursive projection method
(Shroff & Keller 1993) finds the unstable subspace and treats it apart; here it is found by `steps`
Arnoldi iterations on J started from the first residual g0 (the Krylov space the fixed-point iteration
itself explores), each product J q by a forward difference (E(D(z0 + eps q)) - E(D(z0))) / eps, i.e. one
decode and encode of the whole batch, and the step is then projected off it: the iteration keeps E(x)'s
component there instead of amplifying it. (A Newton step on that subspace, the method's other half, diverged
in the probes: a fixed basis goes stale as the iterate moves, and 1/lambda is large for lambda near 0.)

    >>> import torch
    >>> a = torch.diag(torch.tensor([1.0, 0.8, -0.3, 0.5]))  # one expanding direction (index 2)
    >>> v, vals = unstable_directions(lambda z: z @ a.T, torch.ones(1, 4), torch.zeros(1, 4), 4)
    >>> v.shape[1], round(abs(v[0, 0, 2].item()), 3), round(vals[0], 2)
    (1, 1.0, -0.3)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

Tensor = torch.Tensor
EXPANDING_RE = -0.01  # Re lambda below this counts as expanding (the threshold of bench.linear_probe)
REFRESH_STEPS = 10  # Arnoldi steps of each refresh at the current iterate (core.solver's unstable_refresh)
DIFF_EPS = 1e-3  # forward-difference step, relative to ||z0|| per sample
BREAKDOWN = 1e-2  # a new Krylov vector this small relative to its column: the space is exhausted (fp32 products)


_SIDE = {"depth": 0}


@contextmanager
def side_evaluations():
    """Marks the decodes made inside as not the run's iterates (the Arnoldi products, the restart's twin image, the
    default's rival run): a host that traces every decode (bench.measure) asks `in_side_evaluation()` and skips them."""
    _SIDE["depth"] += 1
    try:
        yield
    finally:
        _SIDE["depth"] -= 1


def in_side_evaluation() -> bool:
    return _SIDE["depth"] > 0


def unstable_directions(roundtrip: Callable[[Tensor], Tensor], z0: Tensor, target: Tensor, steps: int,
                        threshold: float = EXPANDING_RE) -> tuple[Tensor, list[float]]:
    """(V, lowest Ritz real part per sample): V (B, p, N) orthonormal rows per sample spanning the Ritz
    vectors of J = d roundtrip / dz at z0 whose Ritz values have Re < threshold (zero rows where a sample has
    fewer than p); p = 0 where none has any. `roundtrip` maps a (B, ...) batch of latents to E(D(z)); it is
    called `steps` + 1 times. Krylov start: the residual g0 = roundtrip(z0) - target."""
    with side_evaluations():
        return _arnoldi(roundtrip, z0, target, steps, threshold)


def _arnoldi(roundtrip, z0: Tensor, target: Tensor, steps: int, threshold: float) -> tuple[Tensor, list[float]]:
    b, n = z0.shape[0], z0[0].numel()
    m = max(1, min(int(steps), n))
    z0f = z0.reshape(b, -1).double()
    f0 = roundtrip(z0).reshape(b, -1).double()
    eps = (DIFF_EPS * z0f.norm(dim=1, keepdim=True)).clamp_min(1e-12)
    q = z0f.new_zeros(b, m + 1, n)
    h = z0f.new_zeros(b, m + 1, m)
    v = f0 - target.reshape(b, -1).double()
    norm = v.norm(dim=1, keepdim=True)
    q[:, 0] = torch.where(norm > 0, v / norm.clamp_min(1e-300), torch.randn_like(v) / n ** 0.5)
    ok = torch.isfinite(f0).all(1)  # a sample whose round trip is not finite gets no directions
    f0 = torch.nan_to_num(f0, 0.0, 0.0, 0.0)
    done = [m] * b  # per sample: Arnoldi steps before its Krylov space was exhausted (to the products' precision)
    for j in range(m):
        w = (roundtrip((z0f + eps * q[:, j]).to(z0.dtype).reshape(z0.shape)).reshape(b, -1).double() - f0) / eps
        ok &= torch.isfinite(w).all(1)
        w = torch.nan_to_num(w, 0.0, 0.0, 0.0)
        for _ in range(2):  # classical Gram-Schmidt, twice
            c = torch.einsum("bkn,bn->bk", q[:, :j + 1], w)
            w = w - torch.einsum("bkn,bk->bn", q[:, :j + 1], c)
            h[:, :j + 1, j] += c
        nw = w.norm(dim=1)
        h[:, j + 1, j] = nw
        q[:, j + 1] = w / nw.clamp_min(1e-300)[:, None]
        # an invariant subspace (its Ritz values exact); what follows would be the forward differences' noise
        exhausted = (nw <= BREAKDOWN * h[:, :j + 1, j].norm(dim=1)).tolist()
        done = [j + 1 if e and d == m else d for e, d in zip(exhausted, done)]
        if all(d <= j + 1 for d in done):
            break
    basis, lowest, ok, h = [], [], ok.tolist(), h.cpu()
    for i in range(b):
        d = done[i]
        vals, vecs = torch.linalg.eig(h[i, :d, :d])  # unit eigenvectors
        lowest.append(vals.real.min().item() if ok[i] else float("nan"))
        cols = []
        if not ok[i]:
            basis.append(torch.zeros(0, n, dtype=torch.float64))
            continue
        # Ritz pairs whose residual ||J u - theta u|| = h[d, d-1] |y[d-1]| is below their distance from the
        # imaginary axis: a normal J certainly has an eigenvalue with Re < 0 that close (Bauer-Fike)
        resid = h[i, d, d - 1].abs() * vecs[d - 1].abs() if d < h.shape[1] else torch.zeros(d, dtype=torch.float64)
        for k in torch.nonzero((vals.real < threshold) & (resid < -vals.real)).flatten().tolist():
            u = q[i, :d].T.cpu().to(vecs.dtype) @ vecs[:, k]
            cols.append(u.real)
            if abs(vals[k].imag.item()) > 1e-9:
                cols.append(u.imag)
        basis.append(torch.linalg.qr(torch.stack(cols, 1))[0].T if cols else torch.zeros(0, n, dtype=torch.float64))
    p = max(v.shape[0] for v in basis)
    out = z0f.new_zeros(b, p, n, dtype=torch.float32)
    for i, v in enumerate(basis):
        out[i, :v.shape[0]] = v.to(out.device, torch.float32)
    return out, lowest


def project_off(g: Tensor, v: Tensor) -> Tensor:
    """g - V^T V g per sample, in place (g (B, ...), V (B, p, N) with orthonormal or zero rows)."""
    if v.shape[1] == 0:
        return g
    gf = g.view(g.shape[0], -1)
    c = torch.bmm(v, gf[:, :, None])  # (B, p, 1)
    gf.sub_(torch.bmm(v.transpose(1, 2), c)[:, :, 0])
    return g
