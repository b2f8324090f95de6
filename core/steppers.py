"""Update rules behind `invert`: each turns the current point and a direction into the next point.

All state is fp32 on the latent's device and every update is in place. `active` is a (B, 1, ...)
0/1 mask: samples that have stopped get a zero step, so a batch behaves like separate runs.
"""
from __future__ import annotations

import torch

from .schedule import paper_lr

Tensor = torch.Tensor


class Adam:
    """Bias-corrected Adam on the direction g with the paper's warm-up + cosine schedule.

    The step size is `lr * scale` with `scale` the RMS of E(x) per sample, so one relative
    default works for raw latents of any VAE (the paper's lr = 0.01 was tuned on SD latents times
    0.18215, whose RMS is about 1). eps is relative to the same scale and to the dtype's noise
    floor: 1e-8 in fp32, 1e-4 in 16-bit, the values of the paper's code.
    """

    def __init__(self, z0: Tensor, scale: Tensor, lr: float, steps: int, eps: float,
                 betas: tuple[float, float] = (0.9, 0.999), schedule: bool = True):
        self.m = torch.zeros_like(z0)
        self.v = torch.zeros_like(z0)
        self.scale, self.lr, self.steps, self.betas, self.schedule = scale, lr, steps, betas, schedule
        self.eps = eps * scale
        self.t = 0

    def step(self, z: Tensor, g: Tensor, active: Tensor) -> None:
        b1, b2 = self.betas
        lr = paper_lr(self.t, self.steps, self.lr) if self.schedule else self.lr
        self.t += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.v / (1 - b2**self.t)).sqrt_().add_(self.eps)
        step = self.m / denom
        step.mul_(self.scale * active * (lr / (1 - b1**self.t)))
        z.sub_(step)


class Forward:
    """The forward step z <- z - rho * g. Converges for rho in (0, 2 beta) when g is beta-cocoercive."""

    def __init__(self, rho: float):
        self.rho = rho

    def step(self, z: Tensor, g: Tensor, active: Tensor) -> None:
        z.sub_(g * (active * self.rho))


class InertialKM:
    """Inertial Krasnoselskii-Mann on the forward-step operator N(z) = z - rho g(z).

    w_{k+1} = y_k - rho g(y_k)   (the relaxation lambda is folded into rho),
    y_{k+1} = w_{k+1} + alpha (w_{k+1} - w_k), and y is the point the solver evaluates next.

    Convergence (a sufficient condition from Bot, Csetnek & Hendrich 2015, "Inertial
    Douglas-Rachford splitting...", Thm. 5, for averaged operators; the paper's analysis is of
    this inertial-KM type): g beta-cocoercive, rho <= 2 beta so that N is nonexpansive, alpha
    constant in [0, 1), and relaxation lambda_k <= (delta - alpha (alpha (1 + alpha) + alpha delta
    + sigma)) / (delta (1 + alpha (1 + alpha) + alpha delta + sigma)) for some sigma > 0 and
    delta > alpha^2 (1 + alpha) + alpha sigma) / (1 - alpha^2). Small alpha (< 1/3) leaves a
    useful range of lambda; larger momentum needs a smaller step.
    """

    def __init__(self, z0: Tensor, rho: float, alpha: float):
        self.rho, self.alpha = rho, alpha
        self.w_prev = z0.clone()

    def step(self, y: Tensor, g: Tensor, active: Tensor) -> None:
        w = y - g * (active * self.rho)
        y.copy_(w).add_((w - self.w_prev) * (active * self.alpha))
        self.w_prev = w


class Anderson:
    """Safeguarded Anderson acceleration (type II) of the forward-step map N(z) = z - rho g(z).

    With f_k = N(z_k) - z_k = -rho g_k and the last `memory` differences dF, dZ of f and z,
    gamma = argmin ||f_k - dF gamma||^2 + reg ||gamma||^2 (Tikhonov; the Gram system is solved in
    fp32 per sample, whatever dtype the VAE runs in), then
    z_{k+1} = z_k + f_k - (dZ + dF) gamma.
    Safeguard: a sample whose residual grew since its last step takes the plain forward step and
    forgets its history (the solver still returns the best iterate).
    """

    def __init__(self, z0: Tensor, rho: float, memory: int = 5, reg: float = 1e-6):
        self.rho, self.memory, self.reg = rho, memory, reg
        self.zs: list[Tensor] = []  # flattened (B, N) iterates, newest last
        self.fs: list[Tensor] = []
        self.valid: list[Tensor] = []  # (B,) bool: entry usable for this sample
        self.prev_norm: Tensor | None = None

    def step(self, z: Tensor, g: Tensor, active: Tensor) -> None:
        zf = z.flatten(1)
        f = g.flatten(1) * -self.rho
        norm = f.norm(dim=1)
        keep = torch.ones_like(norm, dtype=torch.bool) if self.prev_norm is None else norm <= self.prev_norm
        self.prev_norm = norm
        for v in self.valid:  # safeguard: forget the history of samples whose residual grew
            v &= keep
        self.zs.append(zf.clone())
        self.fs.append(f)
        self.valid.append(torch.ones_like(keep))
        if len(self.zs) > self.memory + 1:
            self.zs.pop(0), self.fs.pop(0), self.valid.pop(0)
        update = f.clone()
        if len(self.zs) > 1:
            d_f = torch.stack([b - a for a, b in zip(self.fs[:-1], self.fs[1:])], dim=2)  # (B, N, m)
            d_z = torch.stack([b - a for a, b in zip(self.zs[:-1], self.zs[1:])], dim=2)
            ok = torch.stack([a & b for a, b in zip(self.valid[:-1], self.valid[1:])], dim=1)  # (B, m)
            d_f = d_f * ok[:, None, :]
            d_z = d_z * ok[:, None, :]
            gram = d_f.transpose(1, 2) @ d_f  # (B, m, m)
            scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)
            eye = torch.eye(gram.shape[1], device=gram.device, dtype=gram.dtype)
            gamma = torch.linalg.solve(gram + (self.reg * scale)[:, None, None] * eye,
                                       (d_f.transpose(1, 2) @ f[:, :, None]))  # (B, m, 1)
            update -= ((d_z + d_f) @ gamma)[:, :, 0]
        # reshape, not a view of z: a channels-last latent flattens to a copy
        z.add_((update * active.flatten(1)).reshape(z.shape))
