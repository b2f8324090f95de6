"""`invert`: find z with D(z) = x for a given image x, by one of several methods.

Gradient-free methods (Hong et al., NeurIPS 2024) drive the latent residual
g(z) = E(D(z)) - E(x) to zero without backpropagation: one decoder and one encoder forward per
iteration, no activations kept. The gradient baseline minimises ||D(z) - x||^2 by autograd.
Every iteration decodes z anyway, so the pixel error is free: the solver returns the best
iterate by it, never worse than the plain encoder's z0 = E(x) -- or (options.select, core.twin)
the iterate a twin problem with a known answer picks, where the pixel-best one drifts in the latent.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import torch

from .codec import Codec
from .diagnostics import cocoercivity
from .evaluation import Evaluation, Target, direction, evaluator_for
from .methods import DEFAULT_LR, METHOD_REGISTRY, METHODS, PIXEL_ONLY_METHODS, StepSetup
from .metrics import nmse_db, psnr_from_mse
from .result import InversionResult, SampleStats
from .hybrid import backward_activation_mb, free_memory_mb
from .unstable import REFRESH_STEPS, project_off, side_evaluations, unstable_directions
from .twin import (FLOOR_MARGIN_DB, SELECTIONS, TwinTracker, decode_floor_psnr, off_pace, rival_wins, twin_faithful,
                   twin_of)

Tensor = torch.Tensor
__all__ = ["InversionOptions", "invert", "METHODS", "PIXEL_ONLY_METHODS", "DEFAULT_LR", "STOP_REASONS",
           "REPORTED_RESIDUAL_EVERY"]
# Hosts that only show the gradient methods' residual (the nodes' plot, the CLI's report) encode every 4th
# iterate: 0.73-0.88 of the time on TAEF2, the same latent (bench/results/2026-12-03-cpu-residual-every.md)
REPORTED_RESIDUAL_EVERY = 4
# InversionOptions.rival by the name users pick it by (node input, CLI flag): a method that steps on the pixel
# gradient, or "off"
RIVAL_NAMES = {"diis": "diis", "gradient": "gradient", "off": ""}
RIVALS = tuple(RIVAL_NAMES.values())


@dataclass(frozen=True)
class InversionOptions:
    """Settings of one run. `lr` is relative: Adam-type methods (adam, gradient) step by about
    lr x RMS(E(x)) per element; forward/km use it as the step rho on the residual. None picks
    the method's default (DEFAULT_LR)."""

    # Anderson by default: in the bench's paper protocol it reaches a far lower latent error than
    # the paper's Adam schedule at the same cost per step (bench/results); "adam" is the paper's.
    method: str = "anderson"
    steps: int = 100
    lr: Optional[float] = None
    tolerance: float = 0.0  # stop a sample once its relative residual falls to this (0: off)
    patience: int = 0  # stop a sample after this many iterations without a new best (0: off)
    # Auto-stop ("stalled"): a sample stops after `stall_steps` iterations without a new best
    # during which its residual stayed within `stall_flat_db` dB (without a tracked residual:
    # no new best alone); 0 turns it off. Chosen from measured traces so that the returned latent
    # is the full run's on the bench set (bench/results/*-autostop.md).
    stall_steps: int = 20
    stall_flat_db: float = 1.0
    time_budget: float = 0.0  # seconds: stop every sample at the first sync point past it (0: off)
    momentum: float = 0.3  # km: inertia alpha
    memory: int = 5  # anderson: how many past differences to mix (3-6 is typical)
    schedule: bool = True  # adam/gradient: the paper's warm-up + cosine schedule
    divergence: float = 100.0  # stop a sample whose residual exceeds this x its initial one
    track_residual: bool = True  # gradient, diis, hybrid's gradient phase: also encode iterates to report the residual
    # ... every n-th of them (and the first): an encode costs ~40 % of a diis step on TAEF2, and the trace
    # only plots it. The returned latent's residual is then encoded once at the end. Fixed-point
    # methods encode every iterate anyway (it is their step).
    residual_every: int = 1
    # Keep every n-th iterate and its residual (CPU, fp32) to test the paper's cocoercivity
    # assumption along the trajectory (core.diagnostics.cocoercivity); 0 keeps none. Costs
    # 2 x latent size per kept iterate in host memory; from a GPU the copies go to pinned memory
    # without blocking the loop.
    record_every: int = 0
    # The loop reads its per-sample stats back to the host only every `sync_every` iterations
    # (and at least every 0.25 s): stop rules and the callback act at those points, so the device
    # never idles waiting for the host in between. A batch whose samples all stopped early runs
    # at most sync_every - 1 extra (zero-step) iterations; results are the same for any value.
    sync_every: int = 8
    # hybrid and rival: cap (MiB) on the decoder activations their gradient steps may keep; above it the run
    # stays gradient-free. 0: the hybrid has no cap, the rival (part of the default) takes the device's free
    # memory (core.hybrid.free_memory_mb). A host can pass its own free-memory estimate.
    memory_limit_mb: float = 0.0
    # Which iterate is returned (core.twin): "pixel" the best pixel error; "twin" the iterate where
    # a twin problem with a known answer, run in the same batch, had its lowest latent error;
    # "auto" the twin for fixed-point methods, but never an iterate past the pixel-best, unless the decode reached
    # the input's noise floor (8-bit rounding, or a 16-bit codec's own, core.twin.precision_floor_psnr; then the
    # first iterate at that noise level, core.twin.FLOOR_NEAR_DB, or else pixel), pixel for gradient methods.
    # The twin doubles the batch (time, and memory on GPU).
    select: str = "auto"
    # Where the twin decided (a fixed-point run whose decode stayed below the noise floor): restart
    # that sample from E(x) with every step projected off the round trip's expanding directions (core.unstable),
    # found by this many Arnoldi steps at E(x) (each one decode + encode of the batch) and again, by
    # core.unstable.REFRESH_STEPS, at the current iterate every `unstable_refresh` iterations; the restart's
    # twin pick is returned where any were found. 0 (the default): no restart. Opt-in: on the 64 px bench it fixed
    # kl-f8 stars and texture (item 2: 17 of 18 cells) but took 2.8-3.6x the time on every restarted sample, TAEF2
    # cells with no gain among them, and held out at 32 px it only cost (docs/convergence.md, "Restarting off").
    unstable_steps: int = 0
    unstable_refresh: int = 10
    # Where the twin decided (as above), run those samples again (from rival_early_steps' start) with this gradient
    # method and its own twin, one at a time, and return whichever run's pick core.twin.rival_wins prefers: the one
    # whose twin stood for it (core.twin.twin_faithful), else the one whose twin got closer to its known answer.
    # "" turns it off (the run stays gradient-free).
    # Skipped where the codec has no differentiable decoder (or autograd cannot build it) or its activations (twin
    # included) would exceed memory_limit_mb (0: the device's free memory). On the 64 px bench it made the latent
    # 2.3-7.2 dB closer to the truth on 6 of 9 TAEF2 cells and fixed kl-f8 texture, for 2.2-5x the time on the
    # samples it ran on (docs/convergence.md, "The rival").
    rival: str = "diis"
    # Where the rival (and its twin) starts: the pixel-best of E(x) and the first this many fixed-point iterates of
    # the image (and its twin) alone (0: E(x)), as the hybrid restarts (core.hybrid.EARLY_STEPS): the first step gains
    # several dB before the latent drifts. Measured (bench.rival_start; docs/convergence.md, "The rival's start"):
    # against E(x), the latent closer on 19 bench cells at 32-128 px, farther on 5 (by 0.07-0.70 dB); 3 steps lost
    # 5.4 dB on TAEF2 coffee at 64 px. Computed per image (core.solver._early_start), so a batch matches single runs.
    rival_early_steps: int = 1
    # Then, where the first run's pixel-best iterate is not that start, the rival runs once more from it (its twin from
    # its own pixel-best), raced against and judged by rival_wins against whichever pick stands: where the first run's
    # twin turned unstable early (kl-f8 flat fields at 128 px) its pick is early while the real run kept closing in on
    # the truth; a gradient run from the pixel-best keeps that iterate's latent and fits the pixels. Where the fixed
    # point drifts (TAEF2), its twin drifts too and loses. docs/convergence.md, "The rival from the pixel-best".
    rival_from_pixel_best: bool = True

    def validate(self) -> "InversionOptions":
        if self.method not in METHOD_REGISTRY:
            raise ValueError(f"method must be one of {', '.join(METHOD_REGISTRY)}; got {self.method!r}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1; got {self.steps!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"learning rate must be > 0 (try {METHOD_REGISTRY[self.method].default_lr}); got {self.lr!r}")
        if not self.tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0 (0 turns it off); got {self.tolerance!r}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0 (0 turns it off); got {self.patience!r}")
        if int(self.stall_steps) != self.stall_steps or self.stall_steps < 0:
            raise ValueError(f"stall_steps must be an integer >= 0 (0 turns auto-stop off); got {self.stall_steps!r}")
        if not self.stall_flat_db > 0:
            raise ValueError(f"stall_flat_db must be > 0 dB; got {self.stall_flat_db!r}")
        if not (math.isfinite(self.time_budget) and self.time_budget >= 0):
            raise ValueError(f"time_budget must be seconds >= 0 (0 turns it off); got {self.time_budget!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum!r}")
        if not 1 <= self.memory <= 20:
            raise ValueError(f"memory must be in [1, 20]; got {self.memory!r}")
        if self.record_every < 0:
            raise ValueError(f"record_every must be >= 0 (0 turns it off); got {self.record_every!r}")
        if int(self.residual_every) != self.residual_every or self.residual_every < 1:
            raise ValueError(f"residual_every must be an integer >= 1 (1: every iterate); got {self.residual_every!r}")
        if (self.record_every > 0 and METHOD_REGISTRY[self.method].needs_autograd
                and not (self.track_residual and self.record_every % self.residual_every == 0)):
            raise ValueError(f"record_every needs the residual at the iterates it keeps: set track_residual=True and "
                             f"record_every a multiple of residual_every for {self.method!r}")
        if int(self.sync_every) != self.sync_every or self.sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1; got {self.sync_every!r}")
        if not self.divergence > 1:
            raise ValueError(f"divergence must be > 1; got {self.divergence!r}")
        if not self.memory_limit_mb >= 0:
            raise ValueError(f"memory_limit_mb must be >= 0 (0: no cap); got {self.memory_limit_mb!r}")
        if int(self.unstable_steps) != self.unstable_steps or self.unstable_steps < 0:
            raise ValueError(f"unstable_steps must be an integer >= 0 (0 turns it off); got {self.unstable_steps!r}")
        if int(self.unstable_refresh) != self.unstable_refresh or self.unstable_refresh < 0:
            raise ValueError(f"unstable_refresh must be an integer >= 0 (0: never); got {self.unstable_refresh!r}")
        if self.rival not in RIVALS:
            raise ValueError(f"rival must be one of {', '.join(map(repr, RIVALS))} ('' turns it off); got {self.rival!r}")
        if int(self.rival_early_steps) != self.rival_early_steps or self.rival_early_steps < 0:
            raise ValueError(f"rival_early_steps must be an integer >= 0 (0: the rival starts from E(x)); "
                             f"got {self.rival_early_steps!r}")
        if not isinstance(self.rival_from_pixel_best, bool):
            raise ValueError(f"rival_from_pixel_best must be True or False; got {self.rival_from_pixel_best!r}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {', '.join(SELECTIONS)}; got {self.select!r}")
        return self

    @property
    def residual_stride(self) -> int:
        """Every how many iterates the residual is encoded (with track_residual): residual_every for the
        methods that step without it, every one for the fixed-point methods, whose step it is."""
        return self.residual_every if METHOD_REGISTRY[self.method].needs_autograd else 1

    @property
    def step_size(self) -> float:
        return METHOD_REGISTRY[self.method].default_lr if self.lr is None else float(self.lr)


def _check_image(image: Tensor) -> None:
    if image.ndim not in (4, 5) or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W) or a video (B, 3, T, H, W); got shape {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise ValueError("image batch is empty")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or Inf pixels")


def invert(codec: Codec, image: Tensor, options: InversionOptions | None = None,
           callback: Callable[[int, int, dict], None] | None = None, *,
           target_latent: Tensor | None = None, weight: Tensor | None = None,
           **overrides) -> InversionResult:
    """Invert the decoder at `image` (B, 3, H, W) in [0, 1]; returns the best latent per sample.

    Videos (B, 3, T, H, W) with 5-D latents work the same way: every per-sample measure (pixel
    error, residual norm, RMS scale) flattens all non-batch dimensions, so one video is one sample.

    `callback(k, steps, info)` runs after each evaluation (k = 0 is the plain encoder) with
    info = {"psnr": [...], "residual_db": [...], "active": [...]}; raising from it aborts the run
    (that is how a host cancels). `target_latent` replaces E(x) as the target and the start, for
    callers whose codec cannot see all the pixels the target depends on (core.temporal's chunks). Runs under torch.inference_mode except for the gradient method.

    `weight` (B or 1, 1, H, W) in [0, 1], optional: the pixel error that picks the best iterate
    (and that PSNR reports) is weighted by it, e.g. 1 - inpaint mask to be exact where the image is
    kept; the gradient-free iteration itself is unchanged (its residual is over the whole latent), the
    gradient baseline minimises the weighted error.

    Example (a linear "autoencoder" whose encoder is not the decoder's inverse):
        >>> import torch
        >>> from core import Codec, invert
        >>> w = torch.tensor([[1.0, 0.2, 0.1], [0.3, 0.9, 0.2], [0.1, 0.3, 1.1]])
        >>> dec = lambda z: torch.einsum("ij,bjhw->bihw", w, z)
        >>> enc = lambda x: torch.einsum("ij,bjhw->bihw", 0.9 * torch.eye(3), x)
        >>> x = dec(torch.rand(1, 3, 4, 4) * 0.5)
        >>> r = invert(Codec(enc, dec), x, method="forward", lr=0.8, steps=60)
        >>> r.samples[0].psnr_best > r.samples[0].psnr_initial + 20
        True
    """
    opts = replace(options or InversionOptions(), **overrides).validate()
    _check_image(image)
    if weight is not None and (weight.ndim != 4 or weight.shape[1] != 1 or weight.shape[2:] != image.shape[2:]
                               or weight.shape[0] not in (1, image.shape[0])):
        raise ValueError(f"weight must be (B or 1, 1, H, W) matching image {tuple(image.shape)}; "
                         f"got {tuple(weight.shape)}")
    if METHOD_REGISTRY[opts.method].needs_autograd:
        return _run(codec, image, opts, callback, target_latent, weight)
    with torch.inference_mode():
        first = _run(codec, image, opts, callback, target_latent, weight)
        first = _restart_off_expanding(first, codec, image, opts, callback, weight)
    return _with_rival(first, codec, image, opts, callback, weight)  # a gradient method: outside inference mode


def _to_host(t: Tensor) -> Tensor:
    """A float32 CPU copy of `t` that does not make the host wait: from a GPU it goes into pinned
    memory without blocking, ordered on the stream before the in-place updates that follow."""
    pinned = t.device.type == "cuda"
    out = torch.empty(t.shape, dtype=torch.float32, pin_memory=pinned)
    return out.copy_(t.detach(), non_blocking=pinned)


# codes on the device; "outmatched": a rival run stopped because it can no longer win (core.twin.TwinTracker.outmatched)
STOP_REASONS = ("max_steps", "diverged", "tolerance", "patience", "stalled", "time_budget", "outmatched")
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
               outmatched: Tensor | None = None) -> None:
        """`hold` (real rows of a twin batch): samples that may not stall yet, because their twin's
        latent error is still falling (the iterate it would pick is not reached). `outmatched` (real rows of a
        rival's twin batch): samples whose rival can no longer win; they stop unless another rule stops them."""
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
        if 0 < opts.stall_steps <= k:
            stalled = self.since_best >= opts.stall_steps
            if tracks_residual:  # ... and the residual flat over those iterations
                stalled &= _spread_db(self.trace[1, k - opts.stall_steps:k + 1]) <= opts.stall_flat_db
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


def _spread_db(window: Tensor) -> Tensor:
    """(B,) max - min over the iterations of a (n, B) residual window, skipping iterates whose residual
    was not encoded (NaN, residual_every); -inf where none was (no residual condition then)."""
    seen = window.isfinite()
    return window.masked_fill(~seen, -math.inf).amax(0) - window.masked_fill(~seen, math.inf).amin(0)


def _with_returned_residual(result: InversionResult, codec: Codec, target: Target) -> InversionResult:
    """Fill the residual of samples whose returned iterate was not encoded (residual_every > 1): one
    decode and encode of the returned latents, so the summary never shows a missing residual."""
    missing = [math.isnan(s.residual_db_best) for s in result.samples]
    if not any(missing):
        return result
    b = len(result.samples)  # a twin batch's real rows come first
    with torch.inference_mode():
        z = result.latent.to(codec.dtype)
        res_db = target.residual_db(codec.encode(codec.decode(z)).float() - target.latent[:b]).tolist()
    samples = [replace(s, residual_db_best=r) if m else s for s, m, r in zip(result.samples, missing, res_db)]
    return replace(result, samples=samples)


def _result(state: RunState, log: IterateLog, final_k: int, opts: InversionOptions, dtype: torch.dtype,
            seconds: float) -> InversionResult:
    stopped_at, best_its, reasons = (t.tolist() for t in (state.stopped_at, state.best_iteration, state.reason))
    iterations = [min(s, final_k) for s in stopped_at]
    coco = log.cocoercivity(state.best_z, iterations)
    trace = state.trace[:, :max(iterations) + 1].cpu()  # no rows after the last stop
    trace_psnr, trace_res = psnr_from_mse(trace[0]), trace[1]
    samples = []
    for b, (n, best) in enumerate(zip(iterations, best_its)):
        samples.append(SampleStats(
            psnr_initial=trace_psnr[0, b].item(), psnr_final=trace_psnr[n, b].item(),
            psnr_best=trace_psnr[best, b].item(),
            residual_db_initial=trace_res[0, b].item(), residual_db_final=trace_res[n, b].item(),
            residual_db_best=trace_res[best, b].item(),
            best_iteration=best, iterations=n, stop_reason=STOP_REASONS[reasons[b]], cocoercivity=coco[b]))
    latent = state.best_z if state.best_z.is_inference() else state.best_z.detach().clone()
    return InversionResult(latent=latent, samples=samples, trace_psnr=trace_psnr, trace_residual_db=trace_res,
                           seconds=seconds, method=opts.method, dtype=str(dtype).replace("torch.", ""),
                           options=asdict(opts))


def _twin_batch(codec: Codec, image: Tensor, weight, target_latent, opts: InversionOptions, family: str):
    """(image, weight, target latent, tracker) with each sample's twin appended (core.twin), or the
    inputs unchanged and no tracker where the twin does not apply: selection "pixel", "auto" for
    a gradient method, or a caller-given target latent (it has no image of its own to twin). A 16-bit
    codec's own rounding stops the decode below the 8-bit floor: auto takes the lower of the two
    (core.twin.precision_floor_psnr), so a sample at the codec's floor is not handed to the twin (kl-f8 in
    bf16 with the 8-bit floor alone: the twin's early pick, up to 9 dB worse in the latent than pixel-best)."""
    auto_off = opts.select == "auto" and family != "fixed_point"
    if opts.select == "pixel" or auto_off or target_latent is not None:
        return image, weight, target_latent, None
    x = image.to(device=codec.device, dtype=torch.float32)
    with torch.inference_mode():
        latent = codec.encode(x.to(codec.dtype)).float().contiguous()
    x_t, truth = twin_of(codec, x, latent)
    floor = decode_floor_psnr(codec, x, truth, x_t) if opts.select == "auto" else torch.full((x.shape[0],), math.inf)
    with torch.inference_mode():
        latents = torch.cat([latent, codec.encode(x_t.to(codec.dtype)).float()])
    if weight is not None and weight.shape[0] == x.shape[0] > 1:
        weight = torch.cat([weight, weight])
    return torch.cat([x, x_t]), weight, latents, TwinTracker(truth, floor.to(codec.device))


def _select(result: InversionResult, tracker: TwinTracker, start_latent: Tensor, auto: bool) -> InversionResult:
    """The real samples of a twin batch, each returning its twin's pick where its decode did not reach
    the noise floor: the iterate at the twin's lowest latent error, or E(x) if that one decodes worse, or
    (`auto`) the pixel-best where the twin picked a later iterate; where it did, the first iterate within
    FLOOR_NEAR_DB of the floor (the pixel-best if none was). extra["twin"][i]["why"] says which rule decided
    ("floor", "noise level", "twin", "decoded worse", "pixel best first")."""
    b = tracker.batch
    samples, latent = result.samples[:b], result.latent[:b].clone()
    trace_psnr, trace_res = result.trace_psnr[:, :b], result.trace_residual_db[:, :b]
    floors, twin_k, twin_db = tracker.floor_psnr.tolist(), tracker.iteration.tolist(), tracker.twin_nmse_db()
    start_db = tracker.twin_nmse_start_db()
    near_k = tracker.near_iteration.tolist()
    why = ["floor"] * b
    for i, s in enumerate(samples):
        if s.psnr_best >= floors[i] - FLOOR_MARGIN_DB:  # the decode explains x to within its noise
            k = near_k[i]
            if k >= 0:  # an iterate came within FLOOR_NEAR_DB of the floor: the first one
                why[i], latent[i] = "noise level", tracker.near_z[i]
                samples[i] = replace(s, best_iteration=k, psnr_best=trace_psnr[k, i].item(),
                                     residual_db_best=trace_res[k, i].item(), selection="noise level")
            continue  # else the best pixel iterate stands
        k = twin_k[i]
        if auto and s.best_iteration < k:  # never past the pixel-best: the decode only got worse after it, so x
            # supports none of the later iterates (kl-f8 stars at 64 px: the pixel-best at 22 is -21.20 dB from the
            # true latent, the twin's pick at 31 -19.73; docs/convergence.md, "Never past the pixel-best")
            why[i] = "pixel best first"
            continue
        worse = not trace_psnr[k, i].item() >= s.psnr_initial  # NaN counts as worse
        why[i] = "decoded worse" if worse else "twin"
        latent[i] = start_latent[i] if worse else tracker.z[i]
        k = 0 if worse else k
        samples[i] = replace(s, best_iteration=k, psnr_best=trace_psnr[k, i].item(),
                             residual_db_best=trace_res[k, i].item(), selection="encoder" if worse else "twin")
    for key, value in result.extra.items():  # per-sample lists of the stepper (hybrid): the real rows
        if isinstance(value, list) and len(value) == 2 * b:
            result.extra[key] = value[:b]
    faithful = twin_faithful(result.trace_psnr, result.samples, twin_k, tracker.origin_psnr)
    twin_psnr0 = result.trace_psnr[0, b:].tolist()  # E(x_t)'s: where a later rival's twin gains count from
    result.extra["twin"] = [{"iteration": k, "latent_nmse_db": round(d, 2), "floor_psnr": round(f, 2), "why": w,
                             "faithful": ok, "twin_psnr_initial": p0, "latent_nmse_start_db": round(d0, 2)}
                            for k, d, f, w, ok, p0, d0 in zip(twin_k, twin_db, floors, why, faithful, twin_psnr0,
                                                              start_db)]
    return replace(result, latent=latent, samples=samples, trace_psnr=trace_psnr, trace_residual_db=trace_res,
                   pixel_best_rows=result.latent)


def _start_of(codec: Codec, image: Tensor, rows: Tensor) -> Tensor:
    """E(x) of the given samples (contiguous fp32 on the codec's device)."""
    x = image[rows.to(image.device)].to(device=codec.device, dtype=torch.float32)
    return codec.encode(x.to(codec.dtype)).float().contiguous()


def _left_of(opts: InversionOptions, spent: float) -> float:
    """Seconds of the time budget a follow-up run may still use (inf: no budget)."""
    return opts.time_budget - spent if opts.time_budget > 0 else math.inf


def _rerun(first: InversionResult, codec: Codec, image: Tensor, rows: list[int], opts: InversionOptions, left: float,
           callback, weight, **run_args) -> InversionResult:
    """The samples `rows` of a first run, run again from E(x) with `opts` (within `left` seconds); the callback
    sees their progress after the first run's iterations, the other samples inactive."""
    k1, batch = first.trace_psnr.shape[0], len(first.samples)
    idx = torch.tensor(rows, device=image.device)
    sub_weight = weight[idx.to(weight.device)] if weight is not None and weight.shape[0] > 1 else weight

    def relay(k, steps, info):
        full = {key: [math.nan] * batch if key != "active" else [False] * batch for key in info}
        for j, i in enumerate(rows):
            for key in info:
                full[key][i] = info[key][j]
        callback(k1 + k, k1 + steps, full)

    return _run(codec, image[idx], replace(opts, time_budget=0.0 if math.isinf(left) else left),
                None if callback is None else relay, None, sub_weight, **run_args)


def _merged(first: InversionResult, second: InversionResult, rows: list[int], use: list[int], tag: dict,
            extra_seconds: float = 0.0) -> InversionResult:
    """`first` with the samples rows[j] for j in `use` taken from `second` (a rerun of `rows`): their latent,
    stats and twin record (updated with `tag`). Each such sample's trace column goes on with the rerun's
    iterations right after its own last one, so `best_iteration` and `iterations` index that column (the rerun's
    start, E(x) again, is one iteration) and do not depend on the other samples of the batch."""
    extra = dict(first.extra, twin=[dict(t) for t in first.extra["twin"]])
    if not use:
        return replace(first, seconds=first.seconds + extra_seconds + second.seconds, extra=extra)
    latent, samples = first.latent.clone(), list(first.samples)
    offset = {j: first.samples[rows[j]].iterations + 1 for j in use}
    length = max([first.trace_psnr.shape[0]] + [offset[j] + second.samples[j].iterations + 1 for j in use])
    grow = lambda t: torch.cat([t, torch.full((length - t.shape[0], t.shape[1]), math.nan, dtype=t.dtype)])
    trace_psnr, trace_res = grow(first.trace_psnr), grow(first.trace_residual_db)
    for j in use:
        i, o, s1, s2 = rows[j], offset[j], first.samples[rows[j]], second.samples[j]
        n = s2.iterations + 1
        latent[i] = second.latent[j]
        trace_psnr[o:, i], trace_res[o:, i] = math.nan, math.nan
        trace_psnr[o:o + n, i], trace_res[o:o + n, i] = second.trace_psnr[:n, j], second.trace_residual_db[:n, j]
        samples[i] = replace(s2, psnr_initial=s1.psnr_initial, residual_db_initial=s1.residual_db_initial,
                             best_iteration=0 if s2.selection == "encoder" else o + s2.best_iteration,
                             iterations=o + s2.iterations,  # an index into the column, as best_iteration
                             cocoercivity=s2.cocoercivity or s1.cocoercivity)  # a rival (gradient) run records none
        twin = second.extra["twin"][j]
        extra["twin"][i] = {**twin, "iteration": o + twin["iteration"], **tag}
    return replace(first, latent=latent, samples=samples, trace_psnr=trace_psnr, trace_residual_db=trace_res,
                   seconds=first.seconds + extra_seconds + second.seconds, extra=extra)


TWIN_DECIDED = ("twin", "decoded worse", "pixel best first")  # _select's rules below the noise floor


def _twin_decided(first: InversionResult) -> list[int]:
    """The samples whose returned iterate the twin chose: their decode stayed below the noise floor."""
    return [i for i, t in enumerate(first.extra.get("twin") or []) if t["why"] in TWIN_DECIDED]


def _restart_off_expanding(first: InversionResult, codec: Codec, image: Tensor, opts: InversionOptions, callback,
                           weight) -> InversionResult:
    """The samples whose returned iterate the twin chose (their decode stayed below the noise floor), run again
    from E(x) with every step projected off the round trip's expanding directions (core.unstable); where the
    Arnoldi steps at E(x) found any, that run's twin pick is returned instead (its iterations go on in the sample's
    trace column, _merged)."""
    redo, left = _twin_decided(first), _left_of(opts, first.seconds)
    if opts.unstable_steps == 0 or not redo or left <= 0:
        return first
    start = time.perf_counter()
    with torch.inference_mode():  # which of them expand at E(x) at all: only those are restarted
        at = torch.tensor(redo, device=first.latent.device)
        z0 = _start_of(codec, image, at)
        found, lowest = unstable_directions(_roundtrip(codec), z0, z0, opts.unstable_steps)
    counts = [int(v.abs().sum(1).gt(0).sum()) for v in found.cpu()]
    probe_s = time.perf_counter() - start
    keep = [j for j, c in enumerate(counts) if c > 0]
    redo = [redo[j] for j in keep]
    left -= probe_s
    if not redo or left <= 0:
        return replace(first, seconds=first.seconds + probe_s)
    second = _rerun(first, codec, image, redo, opts, left, callback, weight,
                    deflate=(found[torch.tensor(keep, device=found.device)], [lowest[j] for j in keep]))
    use = [j for j in range(len(redo)) if second.extra["expanding"][j] > 0]
    result = _merged(first, second, redo, use, {"restart": True}, probe_s)
    result.extra["unstable"] = [{"restarted": False, "directions": 0} for _ in first.samples]
    for j, i in enumerate(redo):
        result.extra["unstable"][i] = {"restarted": j in use, "directions": second.extra["expanding"][j],
                                       "lowest_ritz": second.extra["lowest_ritz"][j]}
    return result


def _with_rival(first: InversionResult, codec: Codec, image: Tensor, opts: InversionOptions, callback,
                weight) -> InversionResult:
    """The samples the twin decided for, each run again by the gradient method `opts.rival` with its twin (core.twin),
    from E(x) or (rival_early_steps > 0) _early_start's iterate, then (rival_from_pixel_best) from the first run's
    pixel-best iterate where that is another start, returning whichever pick core.twin.rival_wins prefers. The second
    run only where the pick standing after the first rival was stood for by its twin (twin_faithful), so that the
    twins' latent errors decide: where neither the fixed point nor the early rival explained x as their twins explained
    theirs (every real photo measured: x is not in the decoder's range), the second run never won, on 8 of 8 photos of
    both VAEs at 64 px, raced for 20-90 iterations (+26-62 % of the time; docs/convergence.md "The rival's pace");
    and not where even the early rival's pace could not win (_off_pace_from). Skipped
    where the codec has no differentiable decoder or the rival's activations would exceed memory_limit_mb. One sample
    at a time: diis mixes 20 iterates by a least-squares solve that amplifies the rounding of batched convolutions
    (TAEF2, 64 px: latents up to 0.3 apart between a batch of three and single runs), so a batched rival's result would
    depend on the batch; this way each image's result is its own, and the activations are one sample's (and its twin's)."""
    rows = _twin_decided(first)
    if not opts.rival or not rows or _left_of(opts, first.seconds) <= 0:
        return first
    report = {"method": opts.rival, "candidates": rows, "samples": [], "chosen": [], "twin_nmse_db": [], "skipped": None,
              "outmatched": [], "twin_gain_db": [], "early_steps": opts.rival_early_steps,
              "from_pixel_best": {"samples": [], "chosen": [], "twin_nmse_db": [], "outmatched": [], "twin_gain_db": [],
                                  "off_pace": [], "unjudged": []}}
    if codec.grad_decode is None:
        report["skipped"] = "no differentiable decoder"
    else:  # the twin doubles the batch the backward runs on
        z0 = first.latent[rows[0]:rows[0] + 1]
        # without a cap, the device's free memory: the rival is part of the default, and a backward pass of a full SD
        # decoder at 1024 px keeps ~27 GiB of activations (x2 with the twin), which a CPU host would not survive
        limit, whose = (opts.memory_limit_mb, "limit") if opts.memory_limit_mb > 0 else (free_memory_mb(z0.device), "free")
        try:
            report["activation_estimate_mb"] = 2 * backward_activation_mb(codec.differentiable_decode(), z0)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
            # a decoder autograd cannot run here (a host whose model cannot be copied for it, docs/compat.md: newer
            # ComfyUI's dynamic VRAM): the rival is part of the default, so the run returns the fixed point's pick and
            # says why, where a gradient method the caller asked for raises
            report["skipped"] = f"no differentiable decoder here ({type(e).__name__}: {e})"
        if limit > 0 and report.get("activation_estimate_mb", 0) > limit:
            report["skipped"] = f"memory ({whose} {limit:.0f} MiB)"
    if report["skipped"]:
        return replace(first, extra=dict(first.extra, rival=report))
    # select "twin": the twin's pick even where the decode reaches the noise floor -- a gradient method gets there on
    # flat fields far from the truth (TAEF2 and kl-f8 flat_objects); record_every 0: the kept iterates test the
    # fixed-point iteration's assumption, which a gradient run has not; its residual only feeds the trace: every
    # REPORTED_RESIDUAL_EVERY-th (the same latent, ~25 % less time on TAEF2)
    rival_opts = replace(opts, method=opts.rival, lr=None, rival="", unstable_steps=0, select="twin", record_every=0,
                         residual_every=max(opts.residual_every, REPORTED_RESIDUAL_EVERY))
    result = first
    for i in rows:
        early_start = early_gain = pace = None
        for origin in ("early", "pixel best") if opts.rival_from_pixel_best else ("early",):
            left = _left_of(opts, result.seconds)
            if left <= 0:
                break
            with side_evaluations():  # not the fixed-point run's iterates (a host tracing every decode skips them)
                gains_from = None
                if origin == "early":
                    start, start_s = early_start = _early_start(codec, image, i, opts, weight, left)
                else:
                    if not result.extra["twin"][i]["faithful"]:  # the twins cannot decide there (below)
                        report["from_pixel_best"]["unjudged"].append(i)
                        continue
                    start, start_s = _pixel_best_start(first, codec, image, i, opts, weight, left)
                    if _same_start(start, early_start[0]):  # the pixel-best is the early start: that rival ran
                        result = replace(result, seconds=result.seconds + start_s)
                        continue
                    pace = early_gain / opts.steps
                    if _off_pace_from(start, codec, image, i, result.extra["twin"][i], pace, opts.steps):
                        report["from_pixel_best"]["off_pace"].append(i)
                        result = replace(result, seconds=result.seconds + start_s)
                        continue
                    # its twin is judged along the whole path its start came by: on kl-f8 texture at 64 px the real
                    # run's pixel-best gained 8.1 dB over E(x) where its twin's gained 25.3 (the first run's twin did
                    # not stand for it), which a gain counted from the start (0 against 0 at a pick there) hides
                    gains_from = torch.tensor([first.samples[i].psnr_initial,
                                               first.extra["twin"][i]["twin_psnr_initial"]])
                if left - start_s <= 0:
                    break
                record = report if origin == "early" else report["from_pixel_best"]
                result = _race_rival(result, codec, image, i, rival_opts, left - start_s, callback, weight, start,
                                     start_s, record, gains_from, pace)
                early_gain = record["twin_gain_db"][-1]  # (the early rival's:) what a diis run gained on this twin
    if report["from_pixel_best"]["chosen"]:  # "chosen": the returned latent is a rival's pick, from either start
        report["chosen"] = sorted(set(report["chosen"]) | set(report["from_pixel_best"]["chosen"]))
    result.extra["rival"] = report
    return result


def _race_rival(result: InversionResult, codec: Codec, image: Tensor, i: int, rival_opts: InversionOptions,
                left: float, callback, weight, start: Tensor | None, start_s: float, record: dict,
                gains_from: Tensor | None = None, pace: float | None = None) -> InversionResult:
    """`result` with sample i's rival run from `start` (None: E(x)), whose pick replaces the one standing where
    core.twin.rival_wins prefers it; `record` (the rival report or its from_pixel_best part) notes the run, and its
    twin's gain (dB, from its start to its pick); `gains_from`: (real, twin) PSNRs its twin's faithfulness counts gains
    from (None: its start); `pace`: dB per iteration the race also holds it to (core.twin.off_pace), or None.
    A race: the rival stops once it can no longer win (its twin cannot get closer than the standing pick's, and no
    faithfulness verdict saves it): on real photos with kl-f8 its twin ended 15-20 dB behind after 100 steps."""
    standing = result.extra["twin"][i]
    race = (torch.tensor([standing["latent_nmse_db"]]), torch.tensor([standing["faithful"]]),
            None if pace is None else torch.tensor([pace]))
    second = _rerun(result, codec, image, [i], rival_opts, left, callback, weight, race=race, start=start,
                    origin_psnr=gains_from)
    twin = second.extra["twin"][0]
    wins = rival_wins(standing, twin)
    record["samples"].append(i)
    record["twin_nmse_db"].append(twin["latent_nmse_db"])
    record["twin_gain_db"].append(round(max(twin["latent_nmse_start_db"] - twin["latent_nmse_db"], 0.0), 2))
    if wins:
        record["chosen"].append(i)
    if second.samples[0].stop_reason == "outmatched":
        record["outmatched"].append([i, second.samples[0].iterations])
    return _merged(result, second, [i], [0] if wins else [], {"rival": rival_opts.method}, start_s)


def _pixel_best_start(first: InversionResult, codec: Codec, image: Tensor, i: int, opts: InversionOptions, weight,
                      left: float) -> tuple[Tensor, float]:
    """(start, seconds): sample i's and its twin's pixel-best iterates of the first run, rows (2, ...). Taken from the
    first run where it ran this image alone; in a batch, from a run of the image alone (the first run's options), so
    that each image's result is its own (diis amplifies the rounding of batched convolutions)."""
    if len(first.samples) == 1 and first.pixel_best_rows is not None:
        return first.pixel_best_rows, 0.0
    w = weight if weight is None or weight.shape[0] == 1 else weight[i:i + 1]
    with torch.inference_mode():
        alone = _run(codec, image[i:i + 1], replace(opts, rival="", unstable_steps=0,
                                                     time_budget=0.0 if math.isinf(left) else left), None, None, w)
    return alone.pixel_best_rows, alone.seconds


def _off_pace_from(start: Tensor, codec: Codec, image: Tensor, i: int, standing: dict, pace: float | None,
                   steps: int) -> bool:
    """Whether a rival from `start` (sample i's rows (2, ...)) cannot win against the `standing` pick's twin record
    even gaining `pace` dB per iteration for all its steps (core.twin.off_pace; None: it may run). Measured (race off,
    docs/convergence.md "The rival's pace"): every rival this skips lost; both that won ran."""
    if pace is None:
        return False
    with torch.inference_mode():
        truth = _start_of(codec, image, torch.tensor([i]))  # the twin's answer, E(x)
        start_db = nmse_db(start[1:2], truth).cpu()
    return bool(off_pace(start_db, torch.tensor([pace]), steps, torch.tensor([standing["latent_nmse_db"]])))


def _same_start(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two rival starts (rows (2, ...) on the codec's device; None: E(x)) are the same iterates."""
    return a is b if a is None or b is None else torch.equal(a, b)


def _early_start(codec: Codec, image: Tensor, i: int, opts: InversionOptions, weight,
                 left: float) -> tuple[Tensor | None, float]:
    """(start, seconds): where sample i's rival and its twin start, rows (2, ...) (rival_early_steps K > 0; else
    None: E(x)). A run of the first method on the image and its twin alone; per row the pixel-best of E(x) and its
    first K iterates (as the hybrid restarts, core.hybrid.EARLY_STEPS). Per image, not taken from the batched first
    run: diis amplifies the rounding of batched convolutions, and a batch's results would differ from single runs'."""
    if opts.rival_early_steps == 0:
        return None, 0.0
    w = weight if weight is None or weight.shape[0] == 1 else weight[i:i + 1]
    with torch.inference_mode():  # the image and its twin as the rival's own twin batch has them
        pair, pair_weight, latents, _ = _twin_batch(codec, image[i:i + 1], w, None, replace(opts, select="twin"),
                                                    "fixed_point")
        early_opts = replace(opts, steps=opts.rival_early_steps, select="pixel", rival="", unstable_steps=0,
                             record_every=0, time_budget=0.0 if math.isinf(left) else left)
        early = _run(codec, pair, early_opts, None, latents, pair_weight)
    return early.latent, early.seconds


def _roundtrip(codec: Codec):
    """z -> E(D(z)) in fp32: what core.unstable's Arnoldi differentiates."""
    return lambda v: codec.encode(codec.decode(v.to(codec.dtype))).float()


def _pad_rows(a: Tensor, b: Tensor) -> Tensor:
    """Two (B, p, N) direction stacks as one batch, the shorter padded with zero rows."""
    p = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], p - t.shape[1], t.shape[2])], 1)
    return torch.cat([pad(a), pad(b)])


def _run(codec: Codec, image: Tensor, opts: InversionOptions, callback, target_latent=None, weight=None,
         deflate: tuple[Tensor, list] | None = None, race: tuple[Tensor, Tensor, Tensor | None] | None = None,
         start: Tensor | None = None, origin_psnr: Tensor | None = None) -> InversionResult:
    """`deflate`: (directions, lowest Ritz real parts) of the real rows at E(x), from the restart's probe: project
    every fixed-point step off the round trip's expanding directions (core.unstable), where a twin is run; the
    twin rows' own are found here. `race`: a rival's, (the standing picks' twin errors in dB, whether each stood for
    its run, the twin pace it is held to or None) per sample (TwinTracker.race). `start`: the first iterate of every
    row, twins included (a rival's), instead of the target latent. `origin_psnr`: (2B,) PSNRs the twins' faithfulness
    counts gains from (a rival from the first run's pixel-best: E(x)'s and E(x_t)'s), instead of the first iterate's."""
    started = time.perf_counter()
    method = METHOD_REGISTRY[opts.method]
    batch = image.shape[0]
    if deflate is not None:  # a restart: its twin image is not an iterate either (core.unstable.side_evaluations)
        with side_evaluations():
            image, weight, target_latent, twin = _twin_batch(codec, image, weight, target_latent, opts, method.family)
    else:
        image, weight, target_latent, twin = _twin_batch(codec, image, weight, target_latent, opts, method.family)
    if twin is not None and race is not None:
        twin.race(race[0], race[1], opts.steps, race[2])
    if twin is not None and origin_psnr is not None:
        twin.origin_psnr = origin_psnr.to(device=image.device, dtype=torch.float32)
    target = Target.of(codec, image, weight, target_latent, method.needs_autograd)
    z = target.start()
    if start is not None:
        z.copy_(start)
    eps = 1e-8 if codec.dtype == torch.float32 else 1e-4
    stepper = method.build(StepSetup(z, target.scale, opts.step_size, eps, opts, codec, target.image, target.latent))
    evaluate = evaluator_for(method, codec, target, z, stepper, opts.residual_every if opts.track_residual else 0)
    real_rows = batch if twin is not None else None
    state = RunState(z, opts, evaluate.tracks_residual, real_rows)
    expanding, lowest = None, None
    if deflate is not None and twin is not None and method.family == "fixed_point" and opts.unstable_steps > 0:
        with torch.inference_mode():  # the real rows' were found at this same E(x) by the probe: not again
            twin_dirs, twin_lowest = unstable_directions(_roundtrip(codec), z[batch:], target.latent[batch:],
                                                         opts.unstable_steps)
            expanding, lowest = _pad_rows(deflate[0].to(z.device), twin_dirs), list(deflate[1]) + twin_lowest
            initial = [int(v.abs().sum(1).gt(0).sum()) for v in expanding.cpu()]
    log, sync = IterateLog(opts.record_every), HostSync(opts, callback, started, real_rows)
    for k in range(opts.steps + 1):
        ev = evaluate(k, z, with_grad=k < opts.steps)
        log.keep(k, z, ev)
        state.record_trace(k, ev)
        hold = outmatched = None
        if twin is not None:
            twin.observe(k, z, state.active, ev.pixel_mse)
            hold, outmatched = twin.improved_within(k, opts.stall_steps), twin.outmatched(k, state.trace[0, :k + 1])
        state.record(k, z, ev, hold, outmatched)
        if sync(k, state):
            break
        step_direction = direction(method.family, ev)
        state.mask_stopped(step_direction)
        if expanding is not None:
            project_off(step_direction, expanding)
        stepper.step(z, step_direction, state.active_f)
        if expanding is not None and opts.unstable_refresh > 0 and k > 0 and k % opts.unstable_refresh == 0:
            with torch.inference_mode():
                expanding, _ = unstable_directions(_roundtrip(codec), z, target.latent, REFRESH_STEPS)
    result = _result(state, log, k, opts, codec.dtype, time.perf_counter() - started)
    result.extra.update(getattr(stepper, "summary", dict)())  # e.g. the hybrid's switch and memory path
    if expanding is not None:  # per row (real, then twin): how many directions E(x)'s steps were projected off
        result.extra["expanding"] = initial
        result.extra["lowest_ritz"] = [round(x, 4) for x in lowest]
    if twin is not None:
        result = _select(result, twin, target.latent, opts.select == "auto")
    if opts.track_residual and opts.residual_stride > 1:  # after the twin's pick, which may not have been encoded
        result = _with_returned_residual(result, codec, target)
    result.seconds = time.perf_counter() - started
    return result
