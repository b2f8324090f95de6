"""The per-sample state of one solver run, kept on the device (the trace, the best iterate, the stop rules), and
what reads it back to the host: the callback, the time budget, the kept iterates of the cocoercivity check."""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Optional

import torch

from .diagnostics import cocoercivity
from .evaluation import Evaluation
from .metrics import psnr_from_mse

if TYPE_CHECKING:
    from .solver import InversionOptions

Tensor = torch.Tensor


def _to_host(t: Tensor) -> Tensor:
    """A float32 CPU copy of `t` that does not make the host wait: from a GPU it goes into pinned
    memory without blocking, ordered on the stream before the in-place updates that follow."""
    pinned = t.device.type == "cuda"
    out = torch.empty(t.shape, dtype=torch.float32, pin_memory=pinned)
    return out.copy_(t.detach(), non_blocking=pinned)


# codes on the device; "outmatched": a rival run stopped because it can no longer win (core.twin.TwinTracker.outmatched)
STOP_REASONS = ("max_steps", "diverged", "tolerance", "patience", "stalled", "time_budget", "outmatched",
                "twin_settled")
SYNC_SECONDS = 0.25  # read the stats back at least this often, so progress and cancelling stay live


class RunState:
    """The per-sample state of one run, kept on the device so the loop never waits for it: the
    trace, the best iterate, and the stop rules (diverged > tolerance > patience > stalled)."""

    def __init__(self, z: Tensor, opts: InversionOptions, tracks_residual: bool, real_rows: int | None = None):
        """`real_rows`: with a twin batch (core.twin) the rows from there on are twins, which stop
        with their real sample."""
        batch, device = z.shape[0], z.device
        self.real_rows = real_rows
        self.opts, self.view, self.tracks_residual = opts, (batch,) + (1,) * (z.ndim - 1), tracks_residual
        self.best_z = z.clone()
        self.best_err = torch.full((batch,), math.inf, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.active_f = torch.ones(self.view, device=device)  # the steppers' 0/1 mask
        self.since_best = torch.zeros(batch, dtype=torch.long, device=device)
        self.best_iteration = torch.zeros(batch, dtype=torch.long, device=device)
        self.stopped_at = torch.full((batch,), opts.steps, dtype=torch.long, device=device)
        self.reason = torch.zeros(batch, dtype=torch.long, device=device)
        # rows: pixel MSE, residual dB, active after the stop rules; NaN once a sample stopped
        self.trace = torch.full((3, opts.steps + 1, batch), math.nan, device=device)

    def record_trace(self, k: int, ev: Evaluation) -> None:
        """Row k of the trace (pixel MSE, residual dB; NaN for samples already stopped), which the stop rules of
        record() and a rival's race (core.twin.TwinTracker.outmatched) read."""
        self.trace[0, k].copy_(ev.pixel_mse).masked_fill_(~self.active, math.nan)
        self.trace[1, k].copy_(ev.residual_db).masked_fill_(~self.active, math.nan)

    def record(self, k: int, z: Tensor, ev: Evaluation, hold: Tensor | None = None,
               outmatched: Tensor | None = None, settled: Tensor | None = None) -> None:
        """`hold` (real rows of a twin batch): samples that may not stall yet, because their twin's
        latent error is still falling (the iterate it would pick is not reached). `outmatched` (real rows of a
        rival's twin batch): samples whose rival can no longer win; they stop unless another rule stops them.
        `settled` (real rows, core.polish's run): samples whose twin's error has not fallen for a while."""
        opts, active, err, res = self.opts, self.active, ev.pixel_mse, ev.residual_db
        tracks_residual = self.tracks_residual and ev.residual is not None  # a hybrid may stop encoding
        improved = (err < self.best_err) & active
        torch.where(improved, err, self.best_err, out=self.best_err)
        torch.where(improved.view(self.view), z, self.best_z, out=self.best_z)
        self.best_iteration.masked_fill_(improved, k)
        self.since_best.add_(1).masked_fill_(improved, 0)
        code = torch.zeros_like(self.reason)
        if outmatched is not None:
            code[:outmatched.shape[0]].masked_fill_(outmatched, STOP_REASONS.index("outmatched"))
        if settled is not None:
            code[:settled.shape[0]].masked_fill_(settled, STOP_REASONS.index("twin_settled"))
        if 0 < opts.stall_steps <= k:
            stalled = self.since_best >= opts.stall_steps
            if tracks_residual:  # ... and the residual flat over those iterations
                stalled &= spread_db(self.trace[1, k - opts.stall_steps:k + 1]) <= opts.stall_flat_db
            if hold is not None:
                stalled[:hold.shape[0]] &= ~hold
            code.masked_fill_(stalled, 4)
        if opts.patience > 0:
            code.masked_fill_(self.since_best >= opts.patience, 3)
        if tracks_residual and opts.tolerance > 0:
            code.masked_fill_(res <= 20 * math.log10(opts.tolerance), 2)
        bad = ~torch.isfinite(err)
        if tracks_residual:
            if k == 0:  # A floor on the reference: an exact initial fixed point has a residual of -inf dB.
                self.limit = res.clamp_min(-120.0) + 20 * math.log10(opts.divergence)
            bad |= res.isnan() | (res == math.inf) | (res > self.limit)
        code.masked_fill_(bad, 1)
        stop = active & (code > 0)
        torch.where(stop, code, self.reason, out=self.reason)
        self.stopped_at.masked_fill_(stop, k)
        active &= ~stop
        if self.real_rows is not None:
            active[self.real_rows:] &= active[:self.real_rows]  # disjoint halves: no copy needed
        self.active_f.copy_(active.view(self.view))
        self.trace[2, k].copy_(active)

    def stop_all(self, k: int, reason: str) -> None:
        """Stop every sample still running at iteration k (a host-side rule: time_budget)."""
        self.reason.masked_fill_(self.active, STOP_REASONS.index(reason))
        self.stopped_at.masked_fill_(self.active, k)
        self.active.zero_()
        self.active_f.zero_()

    def mask_stopped(self, step_direction: Tensor | Evaluation) -> None:
        """Zero the step direction(s) of stopped samples, which may hold NaN."""
        if isinstance(step_direction, Evaluation):
            tensors = [t for t in (step_direction.residual, step_direction.pixel_grad,
                                   step_direction.pixel_residual) if t is not None]
        else:
            tensors = [step_direction]
        for t in tensors:
            t.masked_fill_(~self.active.view(self.view), 0.0)


class HostSync:
    """Reads the trace back to the host only every `sync_every` iterations (or SYNC_SECONDS) and at
    the end, and there runs the callback once per iteration since the last read and applies the
    time budget: the device never idles waiting for the host in between."""

    def __init__(self, opts: InversionOptions, callback: Callable[[int, int, dict], None] | None,
                 start: float, rows: int | None = None):
        """`rows`: how many samples the callback sees (a twin batch's real ones)."""
        self.steps, self.every, self.callback, self.rows = opts.steps, opts.sync_every, callback, rows
        self.deadline = start + opts.time_budget if opts.time_budget > 0 else math.inf
        self.synced, self.synced_at = -1, time.perf_counter()  # the last iteration read back, and when

    def __call__(self, k: int, state: RunState) -> bool:
        """After evaluation k: True when the run is over (the last step, or every sample stopped)."""
        final, now = k == self.steps, time.perf_counter()
        if not (final or k - self.synced >= self.every or now - self.synced_at >= SYNC_SECONDS or now >= self.deadline):
            return False
        rows = state.trace[:, self.synced + 1:k + 1].cpu()
        if self.callback is not None:
            seen = rows[:, :, :self.rows]
            for j in range(seen.shape[1]):
                self.callback(self.synced + 1 + j, self.steps, {
                    "psnr": [float(psnr_from_mse(v)) for v in seen[0, j].tolist()],
                    "residual_db": seen[1, j].tolist(), "active": [bool(a) for a in seen[2, j].tolist()]})
        self.synced, self.synced_at = k, time.perf_counter()
        if not final and rows[2, -1].any() and self.synced_at >= self.deadline:
            state.stop_all(k, "time_budget")
            return True
        return final or not rows[2, -1].any()


class IterateLog:
    """Every n-th iterate and its residual on the host, for the cocoercivity check (record_every)."""

    def __init__(self, every: int):
        self.every, self.kept = every, []  # (k, z_k, E(D(z_k)) - E(x))

    def keep(self, k: int, z: Tensor, ev: Evaluation) -> None:
        if self.every and k % self.every == 0:
            self.kept.append((k, _to_host(z), _to_host(ev.residual)))

    def cocoercivity(self, best_z: Tensor, iterations: list[int]) -> list[Optional[dict]]:
        if not self.kept:
            return [None] * len(iterations)
        if best_z.device.type == "cuda":
            torch.cuda.synchronize(best_z.device)  # the kept copies were queued without waiting
        ks = [k for k, _, _ in self.kept]
        last_kept = [max(i for i, k in enumerate(ks) if k <= n) for n in iterations]
        out = cocoercivity([z for _, z, _ in self.kept], [t for _, _, t in self.kept], best_z.detach().cpu(), last_kept)
        self.kept = []
        return out


def spread_db(window: Tensor) -> Tensor:
    """(B,) max - min over the iterations of a (n, B) residual window, skipping iterates whose residual
    was not encoded (NaN, residual_every); -inf where none was (no residual condition then)."""
    seen = window.isfinite()
    return window.masked_fill(~seen, -math.inf).amax(0) - window.masked_fill(~seen, math.inf).amin(0)
