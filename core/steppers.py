"""Update rules behind `invert`: each turns the current point and a direction into the next point.

All state is fp32 on the latent's device, allocated once, and every update is in place (no
latent-sized allocation per step). `active` is a (B, 1, ...) 0/1 float mask: samples that have
stopped get a zero step, so a batch behaves like separate runs.
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
        self.buf = torch.empty_like(z0)
        self.scale, self.lr, self.steps, self.betas, self.schedule = scale, lr, steps, betas, schedule
        self.eps = eps * scale
        self.t = 0

    def step(self, z: Tensor, g: Tensor, active: Tensor) -> None:
        b1, b2 = self.betas
        lr = paper_lr(self.t, self.steps, self.lr) if self.schedule else self.lr
        self.t += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step = torch.div(self.v, 1 - b2**self.t, out=self.buf).sqrt_().add_(self.eps)  # denominator
        torch.div(self.m, step, out=step).mul_(self.scale).mul_(active)
        z.sub_(step, alpha=lr / (1 - b1**self.t))


class Forward:
    """The forward step z <- z - rho * g. Converges for rho in (0, 2 beta) when g is beta-cocoercive."""

    def __init__(self, rho: float):
        self.rho = rho

    def step(self, z: Tensor, g: Tensor, active: Tensor) -> None:
        z.addcmul_(g, active, value=-self.rho)


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
        self.w = torch.empty_like(z0)

    def step(self, y: Tensor, g: Tensor, active: Tensor) -> None:
        w = torch.addcmul(y, g, active, value=-self.rho, out=self.w)
        # w_prev <- alpha * active * (w - w_prev): the inertial term, in the old w_prev's storage
        self.w_prev.sub_(w).mul_(active).mul_(-self.alpha)
        y.copy_(w).add_(self.w_prev)
        self.w_prev.copy_(w)


class Anderson:
    """Safeguarded Anderson acceleration (type II) of the forward-step map N(z) = z - rho g(z).

    With f_k = N(z_k) - z_k = -rho g_k and the last `memory` differences dF, dZ of f and z,
    gamma = argmin ||f_k - dF gamma||^2 + reg ||gamma||^2 (Tikhonov; the Gram system is solved in
    fp32 per sample, whatever dtype the VAE runs in), then
    z_{k+1} = z_k + f_k - (dZ + dF) gamma.
    Safeguard: a sample whose residual grew since its last step takes the plain forward step and
    forgets its history (the solver still returns the best iterate).

    The differences live in ring buffers (B, memory, N) allocated once; a forgotten or not yet
    filled slot is all zeros, which the regularised solve maps to a zero coefficient.
    """

    def __init__(self, z0: Tensor, rho: float, memory: int = 5, reg: float = 1e-6):
        self.rho, self.memory, self.reg = rho, memory, reg
        b, n = z0.shape[0], z0[0].numel()
        self.d_z = z0.new_zeros(b, memory, n)
        self.d_f = z0.new_zeros(b, memory, n)
        self.z_prev = z0.new_zeros(b, n)
        self.f_prev = z0.new_zeros(b, n)
        self.f = z0.new_empty(b, n)
        self.update = z0.new_empty(b, 1, n)
        self.eye = torch.eye(memory, device=z0.device, dtype=z0.dtype)
        self.prev_norm: Tensor | None = None
        self.slot = 0
        self.filled = 0  # differences written so far (host-side: testing the buffers would sync)

    def step(self, z: Tensor, g: Tensor, active: Tensor) -> None:
        zf = z.view(z.shape[0], -1)  # z is the solver's own contiguous iterate
        f = torch.mul(g.reshape(zf.shape), -self.rho, out=self.f)
        norm = torch.linalg.vector_norm(f, dim=1)
        if self.prev_norm is not None:
            # safeguard: a sample whose residual grew forgets its history, including the newest
            # difference (it spans the step that made things worse)
            keep = (norm <= self.prev_norm).to(f.dtype)
            self.d_z.mul_(keep[:, None, None])
            self.d_f.mul_(keep[:, None, None])
            s = self.slot
            torch.sub(zf, self.z_prev, out=self.d_z[:, s]).mul_(keep[:, None])
            torch.sub(f, self.f_prev, out=self.d_f[:, s]).mul_(keep[:, None])
            self.slot = (s + 1) % self.memory
            self.filled += 1
        self.prev_norm = norm
        self.z_prev.copy_(zf)
        self.f_prev.copy_(f)
        update = self.update
        update[:, 0].copy_(f)
        if self.filled:  # else no history yet: the plain forward step
            gram = self.d_f @ self.d_f.transpose(1, 2)  # (B, m, m)
            scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)
            gamma = torch.linalg.solve(gram + (self.reg * scale)[:, None, None] * self.eye,
                                       self.d_f @ f[:, :, None]).transpose(1, 2)  # (B, 1, m)
            update.baddbmm_(gamma, self.d_z, alpha=-1).baddbmm_(gamma, self.d_f, alpha=-1)
        zf.addcmul_(update[:, 0], active.view(-1, 1))
