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
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .codec import Codec
from .evaluation import REPORTED_RESIDUAL_EVERY
from .methods import DEFAULT_LR, METHOD_REGISTRY, METHODS, PIXEL_ONLY_METHODS
from .polish import polish_at_floor
from .rerun import restart_off_expanding
from .result import InversionResult
from .rival import RIVAL_NAMES, RIVALS, with_rival
from .run import run
from .run_state import STOP_REASONS
from .twin import SELECTIONS

Tensor = torch.Tensor
CHECKPOINTS = ("auto", "on", "off")  # InversionOptions.checkpoint
__all__ = ["InversionOptions", "invert", "METHODS", "PIXEL_ONLY_METHODS", "DEFAULT_LR", "STOP_REASONS",
           "REPORTED_RESIDUAL_EVERY", "RIVAL_NAMES", "CHECKPOINTS"]


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
    # stays gradient-free. 0: the device's free memory (core.hybrid.free_memory_mb; no cap where it cannot be told).
    # A host can pass its own free-memory estimate (the nodes pass ComfyUI's). Gradient methods recompute the
    # decoder's blocks above it (checkpoint "auto").
    memory_limit_mb: float = 0.0
    # Gradient steps (gradient methods, the hybrid's gradient phase) backpropagate this many samples at a time
    # (0: the whole batch): autograd keeps only those rows' decoder activations, for about the same compute; each
    # sample's gradient is its own either way (equal up to the rounding of batched convolutions). The rival always
    # takes one row at a time (its sample, then its twin): half the activations of backpropagating the pair.
    backward_rows: int = 0
    # Gradient steps' decoder activations (core.checkpointing): "on" recomputes each block's in the backward where the
    # decoder's blocks are found (SD decoder at 512 px: 0.43x the live tensors, the same gradient, +15-25 % backward
    # time); "off" keeps them all (autograd's default); "auto" keeps them unless that would exceed the cap of the
    # hybrid and the rival (memory_limit_mb, the rival's default: the device's free memory) and recomputing fits,
    # where they would otherwise skip their gradient steps; a gradient method the caller picks (no gradient-free way
    # on) recomputes where keeping would exceed memory_limit_mb, else the device's free memory.
    checkpoint: str = "auto"
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
    # Skipped where the codec has no differentiable decoder (or autograd cannot build it) or its activations (one
    # image's: it backpropagates the sample, then its twin) would exceed memory_limit_mb (0: the device's free
    # memory). On the 64 px bench it made the latent 2.3-7.2 dB closer to the truth on 6 of 9 TAEF2 cells and fixed
    # kl-f8 texture, for 2.2-5x the time on the samples it ran on (docs/convergence.md, "The rival").
    rival: str = "diis"
    # Where the rival (and its twin) starts: the pixel-best of E(x) and the first this many fixed-point iterates of
    # the image (and its twin) alone (0: E(x)), as the hybrid restarts (core.hybrid.EARLY_STEPS): the first step gains
    # several dB before the latent drifts. Measured (bench.rival_start; docs/convergence.md, "The rival's start"):
    # against E(x), the latent closer on 19 bench cells at 32-128 px, farther on 5 (by 0.07-0.70 dB); 3 steps lost
    # 5.4 dB on TAEF2 coffee at 64 px. Computed per image (core.rival._early_start), so a batch matches single runs.
    rival_early_steps: int = 1
    # Then, where the first run's pixel-best iterate is not that start, the rival runs once more from it (its twin from
    # its own pixel-best), raced against and judged by rival_wins against whichever pick stands: where the first run's
    # twin turned unstable early (kl-f8 flat fields at 128 px) its pick is early while the real run kept closing in on
    # the truth; a gradient run from the pixel-best keeps that iterate's latent and fits the pixels. Where the fixed
    # point drifts (TAEF2), its twin drifts too and loses. docs/convergence.md, "The rival from the pixel-best".
    rival_from_pixel_best: bool = True
    # Where the decode reached the noise floor and the first iterate at the noise level is returned: go on from it by
    # this many damped forward (km) steps, its twin from its own, and return the twin's pick (core.polish; 0: off).
    # Past the noise level the pixels cannot rank the latents; the twin can (docs/convergence.md, "Past the noise
    # level").
    floor_steps: int = 100

    def validate(self) -> "InversionOptions":
        if self.method not in METHOD_REGISTRY:
            raise ValueError(f"method must be one of {', '.join(METHOD_REGISTRY)}; got {self.method!r}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1; got {self.steps!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"learning rate must be > 0 (try {METHOD_REGISTRY[self.method].default_lr}); "
                             f"got {self.lr!r}")
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
        if int(self.floor_steps) != self.floor_steps or self.floor_steps < 0:
            raise ValueError(f"floor_steps must be an integer >= 0 (0 turns it off); got {self.floor_steps!r}")
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
            raise ValueError("memory_limit_mb must be >= 0 (0: the device's free memory); "
                             f"got {self.memory_limit_mb!r}")
        if int(self.backward_rows) != self.backward_rows or self.backward_rows < 0:
            raise ValueError(f"backward_rows must be an integer >= 0 (0: the whole batch at once); "
                             f"got {self.backward_rows!r}")
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}; got {self.checkpoint!r}")
        if int(self.unstable_steps) != self.unstable_steps or self.unstable_steps < 0:
            raise ValueError(f"unstable_steps must be an integer >= 0 (0 turns it off); got {self.unstable_steps!r}")
        if int(self.unstable_refresh) != self.unstable_refresh or self.unstable_refresh < 0:
            raise ValueError(f"unstable_refresh must be an integer >= 0 (0: never); got {self.unstable_refresh!r}")
        if self.rival not in RIVALS:
            raise ValueError(f"rival must be one of {', '.join(map(repr, RIVALS))} ('' turns it off); "
                             f"got {self.rival!r}")
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


# how far outside [0, 1] an image may reach: a resampling filter overshoots at hard edges by a few percent (kept: the
# decode, in [0, 1], gets as close as it can); a [-1, 1] tensor or 0..255 values, a wrong convention, reach far past it
RANGE_SLACK = 0.25


def _check_image(image: Tensor) -> None:
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor (B, 3, H, W) in [0, 1]; got {type(image).__name__}: a file "
                        "reads with exact_encode.adapters.images.load_image, an (H, W, 3) uint8 array a with "
                        "torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255")
    if image.ndim not in (4, 5) or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W) or a video (B, 3, T, H, W); got shape {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise ValueError("image batch is empty")
    if not image.is_floating_point():
        raise ValueError(f"image is {image.dtype}; invert takes float pixels in [0, 1]: for 8-bit values pass "
                         "image.float() / 255")
    low, high = (v.item() for v in image.aminmax())  # one pass: a NaN or Inf pixel shows in them
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("image contains NaN or Inf pixels")
    if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
        raise ValueError(f"image values span {low:.3g}..{high:.3g}; invert takes pixels in [0, 1]: a tensor in "
                         "[-1, 1] (diffusers' VaeImageProcessor.preprocess) converts with (image + 1) / 2, values "
                         "in 0..255 with image / 255")


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
    callers whose codec cannot see all the pixels the target depends on (core.temporal's chunks). Runs under
    torch.inference_mode except for the gradient method.

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
        return run(codec, image, opts, callback, target_latent, weight)
    with torch.inference_mode():
        first = run(codec, image, opts, callback, target_latent, weight)
        first = restart_off_expanding(first, codec, image, opts, callback, weight)
        first = polish_at_floor(first, codec, image, opts, callback, weight)
    return with_rival(first, codec, image, opts, callback, weight)  # a gradient method: outside inference mode
