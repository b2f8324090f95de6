"""The `hybrid` method: gradient-free while it pays, then gradient steps from the best iterate.

Why (docs/convergence.md): the fixed-point step E(D(z)) - E(x) has components along latent
directions the decoder barely responds to, and nothing pulls them back, so after the first
iterations the latent drifts while the pixel error stalls. The pixel-loss gradient
J_D^T (D(z) - x) has no component there. So each sample runs safeguarded Anderson until its
pixel error has not reached a new best for STALL iterations, restarts from its best iterate, and
continues with Adam on ||D(z) - x||^2 (lr GRAD_LR x RMS(E(x)), constant: the best gradient
setting in the bench).

Memory: gradient steps keep the decoder's activations for the backward pass. With
`memory_limit_mb` > 0 the need is estimated before the first gradient step (autograd's saved
tensors at two small latent crops, extrapolated linearly in area, so weights cancel); above the
cap the sample stays gradient-free (no checkpointing here: a checkpoint of the whole decoder does
not lower the peak, and chunking it needs the model's structure).
"""
from __future__ import annotations

import math

import torch

from .steppers import Adam, Anderson

Tensor = torch.Tensor
STALL = 3  # iterations without a new best pixel error after which the fixed point has stopped paying
GRAD_LR = 0.03  # relative Adam step of the gradient phase


def _saved_bytes(decode, z: Tensor) -> int:
    """Bytes autograd would keep for the backward pass of decode(z) (the forward only runs)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return None  # nothing is kept: no backward follows

    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        decode(z.detach().clone().requires_grad_(True))
    return total


def backward_activation_mb(decode, z: Tensor) -> float:
    """Estimated activation memory (MiB) of one backward of `decode` at the latent `z` (B, C, h, w):
    saved tensors at crops of c and 2c cells per side, S(a) = weights + alpha * a, extrapolated to
    the full area. Latents smaller than 2 cells a side are measured whole (an over-estimate)."""
    h, w = z.shape[-2:]
    c = min(h, w) // 2
    if c < 1:
        return _saved_bytes(decode, z) / 2**20
    small = _saved_bytes(decode, z[:1, ..., :c, :c])
    large = _saved_bytes(decode, z[:1, ..., :2 * c, :2 * c])
    per_cell = max(large - small, 0) / (3 * c * c)
    return per_cell * h * w * z.shape[0] / 2**20


class Hybrid:
    """Stepper of family "both" (core.methods): per sample, Anderson on the residual, then Adam on
    the pixel gradient from the best iterate once the fixed point stalls (if memory allows)."""

    def __init__(self, z0: Tensor, scale: Tensor, rho: float, memory: int, eps: float,
                 decode_grad=None, memory_limit_mb: float = 0.0):
        """`decode_grad`: the differentiable decoder, needed only to estimate memory against a cap."""
        batch, self.view = z0.shape[0], (z0.shape[0],) + (1,) * (z0.ndim - 1)
        self.fixed_point = Anderson(z0, rho, memory)
        self.scale, self.eps, self.adam = scale, eps, None
        self.best_z = z0.clone()
        self.best_err = torch.full((batch,), math.inf, device=z0.device)
        self.since_best = torch.zeros(batch, dtype=torch.long, device=z0.device)
        self.switched = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        self.any_switched = False
        self.switch_iteration = [None] * batch
        self.k = 0
        self.limit_mb, self.estimate_mb = memory_limit_mb, None
        self.gradient_allowed = True  # the evaluator already holds a differentiable decoder
        if memory_limit_mb > 0:
            self.estimate_mb = backward_activation_mb(decode_grad, z0)
            self.gradient_allowed = self.estimate_mb <= memory_limit_mb

    def wants_pixel_grad(self, k: int) -> bool:
        return self.any_switched

    def step(self, z: Tensor, ev, active: Tensor) -> None:
        improved = ev.pixel_mse < self.best_err
        torch.where(improved, ev.pixel_mse, self.best_err, out=self.best_err)
        torch.where(improved.view(self.view), z, self.best_z, out=self.best_z)
        self.since_best.add_(1).masked_fill_(improved, 0)
        self.k += 1
        if self.gradient_allowed:
            new = (~self.switched) & (self.since_best >= STALL) & active.view(-1).bool()
            if new.any():  # one host read per iteration until every sample switched
                z.copy_(torch.where(new.view(self.view), self.best_z, z))  # restart from the best
                self.switched |= new
                for b in new.nonzero().view(-1).tolist():
                    self.switch_iteration[b] = self.k
                if self.adam is None:
                    self.adam = Adam(z, self.scale, GRAD_LR, 1, self.eps, schedule=False)
                self.any_switched = True
        free = (~self.switched).view(self.view).to(z.dtype)
        if not self.switched.all():
            self.fixed_point.step(z, ev.residual, active * free)
        if self.any_switched and ev.pixel_grad is not None:
            self.adam.step(z, ev.pixel_grad, active * (1 - free))

    def summary(self) -> dict:
        """How the run went: per sample the iteration of the switch (None: gradient-free to the end),
        whether gradient steps were allowed, and the activation estimate against the cap."""
        return {"switch_iteration": list(self.switch_iteration), "gradient_allowed": self.gradient_allowed,
                "activation_estimate_mb": self.estimate_mb, "memory_limit_mb": self.limit_mb}
