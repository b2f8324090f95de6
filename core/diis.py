"""The `diis` method: pixel-gradient descent accelerated by DIIS (Pulay mixing) on the pixel residual.

Why (docs/convergence.md): with an encoder that is not the decoder's inverse (TAEF2) the
gradient-free steps stall 10-15 dB below what the pixel gradient reaches, and Adam on the gradient
converges linearly and slowly (the decoder's Jacobian is ill-conditioned). DIIS keeps the last
MEMORY iterates and mixes them so that the linearised pixel residual D(z) - x of the mix is least
squares, then steps from the mix along the mixed preconditioned gradient: a Krylov-type
acceleration of the gradient step, aimed at D(z) = x itself rather than at a fixed point of E o D.
Measured (`python -m bench.hybrid_probe <vae> <9 bench images> 64 diis`, BETA2 0.995): it reaches the
100-step PSNR of Adam at 0.03 x RMS, constant, in 32-91 steps on TAEF2 and 44-67 on kl-f8, and ends
higher on all 18 (docs/convergence.md has the bench.run table).

Costs over Adam: 2 x MEMORY latent-sized and MEMORY image-sized fp32 buffers per sample (the pixel
differences), and one (MEMORY x MEMORY) solve per step.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor
MEMORY = 20  # differences mixed: 5 stalled on a TAEF2 photo; 20 ended higher than 10 on 17 of 18 bench cells
# decay of the RMSprop average of g^2 that preconditions the gradient: 0.995 took as few or fewer evaluations to
# Adam's 100-step PSNR than 0.999 on 17 of 18 bench cells (8 % fewer in all) and ended higher on 15;
# 0.99 never reached it on TAEF2 texture (bench/results/2026-12-03-cpu-diis-beta2-probe.md)
BETA2 = 0.995


class PixelDIIS:
    """Stepper of family "pixel" (core.methods): gets the whole Evaluation (pixel gradient, pixel
    residual, pixel error). Per sample, with s_k = lr * scale * g_k / sqrt(v_k) and the last
    differences dZ, dP, dS of the iterates, the pixel residuals and the steps,
    gamma = argmin ||p_k - dP gamma||^2 + reg ||gamma||^2 and
    z_{k+1} = z_k - dZ gamma - (s_k - dS gamma).
    Safeguard: a sample whose pixel error rose keeps only its newest difference (the one that spans
    the bad step, so the next mix can move back along it) and forgets the rest."""

    def __init__(self, z0: Tensor, scale: Tensor, lr: float, memory: int = MEMORY, reg: float = 1e-6):
        self.lr, self.memory, self.reg = lr, memory, reg
        self.scale = scale.view(-1, 1)
        b, n = z0.shape[0], z0[0].numel()
        self.v = z0.new_zeros(b, n)
        self.d_z, self.d_s = z0.new_zeros(b, memory, n), z0.new_zeros(b, memory, n)
        self.d_p = None  # (B, memory, pixels), allocated at the first step (the image size is known then)
        self.z_prev, self.s_prev = z0.new_zeros(b, n), z0.new_zeros(b, n)
        self.p_prev, self.err_prev = None, None
        self.fresh = torch.ones(b, dtype=torch.bool, device=z0.device)  # no previous iterate to difference
        self.s, self.update = z0.new_empty(b, n), z0.new_empty(b, 1, n)  # buffers: no allocation per step
        self.eye = torch.eye(memory, device=z0.device, dtype=z0.dtype)
        self.slot, self.filled = 0, 0

    def forget(self, samples: Tensor) -> None:
        """Restart the history (differences and preconditioner) of `samples` (B,) bool, e.g. after
        their iterate was moved by someone else (core.hybrid's restart)."""
        self.fresh |= samples

    def _direction(self, g: Tensor) -> Tensor:
        """The preconditioned step s = lr * scale * g / sqrt(v) (RMSprop; v starts at the first g^2)."""
        self.v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
        torch.where(self.fresh[:, None], g.square(), self.v, out=self.v)
        s = torch.div(g, self.v.sqrt().clamp_min(1e-30), out=self.s)  # g = 0 gives 0, not NaN
        return s.mul_(self.scale).mul_(self.lr)

    def _remember(self, z: Tensor, p: Tensor, s: Tensor, err: Tensor) -> None:
        if self.p_prev is None:
            self.d_p = p.new_zeros(p.shape[0], self.memory, p.shape[1])
            self.p_prev, self.err_prev = torch.zeros_like(p), err.clone()
        fresh = self.fresh[:, None, None]
        keep = ((err <= self.err_prev)[:, None, None] & ~fresh).to(z.dtype)
        i = self.slot
        for buf, now, prev in ((self.d_z, z, self.z_prev), (self.d_s, s, self.s_prev), (self.d_p, p, self.p_prev)):
            buf.mul_(keep)  # a sample whose error rose forgets all but the newest difference
            torch.sub(now, prev, out=buf[:, i])
            buf[:, i].masked_fill_(fresh[:, 0], 0)  # ... and a fresh one has none yet
        self.slot, self.filled = (i + 1) % self.memory, self.filled + 1
        self.fresh.zero_()
        self.z_prev.copy_(z)
        self.s_prev.copy_(s)
        self.p_prev.copy_(p)
        self.err_prev = err.clone()

    def step(self, z: Tensor, ev, active: Tensor) -> None:
        zf = z.view(z.shape[0], -1)  # the solver's own contiguous iterate
        p = ev.pixel_residual.reshape(z.shape[0], -1)
        s = self._direction(ev.pixel_grad.reshape(zf.shape))
        self._remember(zf, p, s, ev.pixel_mse)
        update = self.update  # z_{k+1} = z_k - update
        update[:, 0].copy_(s)
        if self.filled > 1:  # the first step has no difference
            gram = self.d_p @ self.d_p.transpose(1, 2)  # (B, m, m)
            diag = gram.diagonal(dim1=1, dim2=2)  # the regularisation is relative to the kept differences
            kept = (diag > 0).sum(1)
            level = torch.where(kept > 0, diag.sum(1) / kept.clamp_min(1), 1.0)  # no difference: gamma = 0
            gamma = torch.linalg.solve(gram + (self.reg * level)[:, None, None] * self.eye,
                                       self.d_p @ p[:, :, None]).transpose(1, 2)  # (B, 1, m)
            update.baddbmm_(gamma, self.d_z).baddbmm_(gamma, self.d_s, alpha=-1)
        zf.addcmul_(update[:, 0], active.view(-1, 1), value=-1)
