"""The `hybrid` method: gradient-free while it pays, then `diis` (core.diis) from an early fixed-point iterate.

Why (docs/convergence.md): the fixed-point step E(D(z)) - E(x) has components along latent
directions the decoder barely responds to, and nothing pulls them back, so after the first
iterations the latent drifts while the pixel error stalls. The pixel-loss gradient
J_D^T (D(z) - x) has no component there. So each sample runs safeguarded Anderson until its
best PSNR gains less than MIN_GAIN_DB per iteration (over STALL), unless that gain still projects it to the
noise floor within NEAR_FLOOR_ITERATIONS. If by then its best decode reached
the input's noise floor (8-bit rounding, or a 16-bit codec's own: core.twin), the fixed point has done what the gradient
would (kl-f8 on most images, in 8-17 iterations) and the sample stays gradient-free. Otherwise it
restarts from the pixel-best of E(x) and the first EARLY_STEPS fixed-point iterates and takes `diis` steps
(DIIS-accelerated pixel-gradient steps): from the fixed point's best iterate, which carries the drift, the
gradient made slower progress than from E(x) on TAEF2 (`bench.hybrid_probe`'s and+diis against and|diis), but
the first few steps gain several dB before the drift sets in (session 14: fewer evaluations on 9 of the 12 cells
that switch). The returned iterate is the best of both phases (the solver's selection), so the restart costs
nothing in the result.

Memory: gradient steps keep the decoder's activations for the backward pass. With a cap (`memory_limit_mb`, else
the device's free memory: core.methods) the need is estimated before the first gradient step (autograd's saved
tensors at two small latent crops, extrapolated linearly in area, so weights cancel); above the
cap, with `checkpoint` "auto", the decoder's blocks are recomputed in the backward where that fits
(core.checkpointing: block by block, found by the model's structure); else the sample stays
gradient-free. The estimate leaves out diis's own buffers (core.diis: 20 image-sized and 40
latent-sized fp32 per sample, 63 MB at 512 px): about 1 % of the SD decoder's backward (6.0 GiB of
live tensors at 512 px, docs/measurements.md).
"""
from __future__ import annotations

import math

import torch

from .checkpointing import SavedTally, recomputed_blocks, recomputing
from .diis import PixelDIIS
from .metrics import psnr_from_mse
from .steppers import Anderson
from .twin import FLOOR_MARGIN_DB
from .unstable import side_evaluations

Tensor = torch.Tensor
STALL = 3  # the fixed point has stopped paying when its best PSNR gained at most
# STALL x MIN_GAIN_DB over the last STALL iterations: below what diis gains per step on average on its way
# to Adam's 100-step PSNR on TAEF2 (0.23-0.74 dB, median 0.38), at about its cost. Measured (bench.hybrid_probe,
# 18 cells, bench/results/2026-12-03-cpu-hybrid-switch-probe.md): 0.3 took fewer evaluations than 0 (no new best) on
# 11 and as many on 7. Kl-f8's Anderson gains >= 0.58 dB per iteration until its decode reaches the floor,
# so 0.3 keeps those with a margin of 2 (1.0 switched flat_noise early: 65 evaluations instead of 14).
MIN_GAIN_DB = 0.3
# ... unless it is still closing on the floor: a sample whose gain over the last STALL iterations projects it to
# the floor within NEAR_FLOOR_ITERATIONS more keeps its fixed point, since restarting near E(x) costs diis 30-90
# evaluations to get back there and lands on a latent far from the fixed point's (kl-f8 at 128 px on an H200:
# Anderson stalled 0.1 dB short of floor - 1 dB at iteration 12, the restart ended 18 dB worse in latent NMSE and
# slower than Adam; docs/convergence.md, "On a GPU"). TAEF2 stalls 10-25 dB below its floor: it still switches.
NEAR_FLOOR_ITERATIONS = 10
DIIS_LR = 0.02  # the gradient phase's relative step: method diis's default
# Where diis restarts: the pixel-best of the fixed point's first EARLY_STEPS iterates (0: E(x) itself). The first
# fixed-point steps gain several dB at a forward pass each before the latent drifts; later iterates carry the drift,
# from which diis made slower progress (`and+diis`). Measured (bench.hybrid_probe, TAEF2, 64 px, 9 images): diis
# from Anderson's 3rd iterate reached Adam's 100-step PSNR in a median 43 evaluations instead of 57 from E(x), fewer
# on 7 of 9; from the 6th, 46 (docs/convergence.md, "The hybrid's restart point").
EARLY_STEPS = 3


def _tally(decode, z: Tensor, recompute: bool = False) -> SavedTally:
    """What autograd would save for the backward pass of decode(z) (the forward only runs); `recompute`: with its
    blocks recomputed (core.checkpointing)."""
    tally = SavedTally()
    with recomputing(recompute):
        tally.count(decode, z)
    return tally


def _extrapolated_peak(small: SavedTally, large: SavedTally, cells: tuple[int, int, int]) -> float:
    """The backward's peak (bytes) at `cells` = (small crop's, large crop's, full) latent cells: each saved tensor's
    size extrapolated in area from the two crops (a weight's, the same at both, drops out: it is not an activation),
    then the peak simulated at full size -- extrapolating the peak itself fails where its argmax moves between the
    crops. Where the two forwards saved different tensors, the peaks' own difference is extrapolated."""
    small_cells, large_cells, full_cells = cells

    def grown(a: int, b: int) -> float:
        return max(b - a, 0) / (large_cells - small_cells) * full_cells

    if len(small.events) != len(large.events):
        return grown(small.total, large.total)
    scaled = SavedTally()
    scaled.events = [(grown(ks, kl), grown(ps, pl), block)
                     for (ks, ps, block), (kl, pl, _) in zip(small.events, large.events)]
    return scaled.total


def backward_activation_mb(decode, z: Tensor, recompute: bool = False) -> float:
    """Estimated activation memory (MiB) of one backward of `decode` at the latent `z` (B, C, h, w), `recompute`: with
    the decoder's blocks recomputed (core.checkpointing.SavedTally: the backward's peak, simulated): the saved
    tensors at crops of c and 2c cells per side, each extrapolated to the full area (_extrapolated_peak). Latents
    too small to crop are measured whole (an over-estimate: weights count too). A tiled decode (core.tiling) only
    takes its grid's latent, and its backward keeps every tile's activations: its base decode's estimate for one tile,
    times the tiles' summed area (overlaps counted twice)."""
    tiled = getattr(decode, "tiles_of", None)
    if tiled is not None:
        base, grid = tiled
        areas = [(y1 - y0) * (x1 - x0) for y0, y1, x0, x1, _ in grid.tiles(1)]
        y0, y1, x0, x1, _ = next(grid.tiles(1))
        return backward_activation_mb(base, z[..., y0:y1, x0:x1], recompute) * sum(areas) / areas[0]
    h, w = z.shape[-2:]
    c = min(h, w) // 2
    try:
        if c < 1:
            raise ValueError("no crop")
        small = _tally(decode, z[:1, ..., :c, :c], recompute)
        large = _tally(decode, z[:1, ..., :2 * c, :2 * c], recompute)
    except (RuntimeError, ValueError):  # too small to crop, or a decoder that cannot take such a crop (LTXV: 1 x 1)
        return _tally(decode, z, recompute).total / 2**20  # the forward alone (nothing kept): weights counted too
    return _extrapolated_peak(small, large, (c * c, 4 * c * c, h * w * z.shape[0])) / 2**20


def backward_plan(decode, z: Tensor, limit_mb: float, checkpoint: str) -> tuple[float, bool]:
    """(estimated activation MiB, whether to recompute the decoder's blocks) for a backward of `decode` at `z` under
    the cap `limit_mb` (<= 0: none) and InversionOptions.checkpoint: "on" recomputes where the decoder can, "off"
    never, "auto" only where keeping the activations would exceed the cap and recomputing them fits under it (then
    the gradient steps run instead of being skipped)."""
    can = recomputed_blocks(decode) > 0
    recompute = checkpoint == "on" and can
    estimate = backward_activation_mb(decode, z, recompute)
    if 0 < limit_mb < estimate and checkpoint == "auto" and can:
        return backward_activation_mb(decode, z, True), True
    return estimate, recompute


def free_memory_mb(device) -> float:
    """What a backward pass may take on `device` (MiB): the GPU's free memory, else the host's available memory
    (Linux MemAvailable; psutil where installed); 0 where it cannot be told (no cap)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**10
    except (OSError, StopIteration, ValueError):
        return 0.0


def memory_cap_mb(limit_mb: float, device) -> float:
    """InversionOptions.memory_limit_mb as the cap the hybrid, the rival and the gradient methods check: the caller's,
    else (0) the device's free memory (0, no cap, where that cannot be told)."""
    return float(limit_mb) if limit_mb > 0 else free_memory_mb(device)


class Hybrid:
    """Stepper of family "both" (core.methods): per sample, Anderson on the residual; once it stalls
    below the target's noise floor (and if memory allows), `diis` on the pixel gradient from the pixel-best of E(x)
    and the first EARLY_STEPS fixed-point iterates."""

    def __init__(self, z0: Tensor, scale: Tensor, rho: float, memory: int, floor_psnr: Tensor,
                 decode_grad=None, memory_limit_mb: float = 0.0, encoded: Tensor | None = None,
                 checkpoint: str = "off", backward_z: Tensor | None = None):
        """`floor_psnr`: (B,) the target's noise floor (core.twin.decode_floor_psnr); `decode_grad`: the
        differentiable decoder, needed only to estimate memory against a cap; `encoded`: E(x), read only (the
        solver's target; None: a copy of z0); `checkpoint`: InversionOptions.checkpoint (backward_plan);
        `backward_z`: the rows of z0 one backward takes (InversionOptions.backward_rows; None: all)."""
        batch, self.view = z0.shape[0], (z0.shape[0],) + (1,) * (z0.ndim - 1)
        self.fixed_point = Anderson(z0, rho, memory)
        self.scale, self.gradient = scale, None  # the diis stepper, built at the first switch
        # where the gradient phase starts: E(x), then the pixel-best of the first EARLY_STEPS iterates
        self.restart = (z0 if encoded is None else encoded).clone()
        self.floor_psnr = floor_psnr.to(z0.device) - FLOOR_MARGIN_DB
        self.best_err = torch.full((batch,), math.inf, device=z0.device)
        self.best_db = torch.full((STALL + 1, batch), -math.inf, device=z0.device)  # ring: the last bests
        self.switched = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        self.settled = torch.zeros(batch, dtype=torch.bool, device=z0.device)  # stalled at the floor
        # host copies of the per-sample flags, refreshed by one read per _switch: the loop never waits
        # for the device to ask them
        self.any_switched = self.all_switched = self.all_done = False
        self.switch_iteration = [None] * batch
        self.k = 0
        self.limit_mb, self.estimate_mb = memory_limit_mb, None
        self.gradient_allowed = True  # the evaluator already holds a differentiable decoder
        # read by core.run: the evaluator's backward recomputes the decoder's blocks (where it can)
        self.recompute = checkpoint == "on"
        if memory_limit_mb > 0:
            with side_evaluations():  # small crops, not iterates (a host tracing every decode skips them)
                self.estimate_mb, self.recompute = backward_plan(decode_grad, z0 if backward_z is None else backward_z,
                                                                 memory_limit_mb, checkpoint)
            self.gradient_allowed = self.estimate_mb <= memory_limit_mb

    def wants_pixel_grad(self, k: int) -> bool:
        return self.any_switched

    def wants_residual(self, k: int) -> bool:
        """Whether the step needs the encode (the fixed point's); once every sample takes gradient steps
        the evaluator encodes only for the trace (every residual_every-th iterate, none without
        track_residual)."""
        return not self.all_switched

    def _switch(self, z: Tensor, active: Tensor) -> None:
        """Samples that stalled: at the floor they stay gradient-free, below it they restart from an early iterate."""
        now, then = self.best_db[self.k % (STALL + 1)], self.best_db[(self.k + 1) % (STALL + 1)]
        gained_little = ~(now - then > STALL * MIN_GAIN_DB) & (self.k > STALL)  # inf - inf: no gain
        at_floor = now >= self.floor_psnr
        closing_in = ~at_floor & ((self.floor_psnr - now) * STALL < NEAR_FLOOR_ITERATIONS * (now - then))
        stalled = ~(self.switched | self.settled) & gained_little & ~closing_in & active.view(-1).bool()
        self.settled |= stalled & at_floor
        new = stalled & ~at_floor
        # the one host read per iteration until every sample switched or settled
        any_new, self.all_done, self.all_switched = torch.stack(
            [new.any(), (self.switched | self.settled | new).all(), (self.switched | new).all()]).tolist()
        if any_new:
            z.copy_(torch.where(new.view(self.view), self.restart, z))
            if self.gradient is None:
                self.gradient = PixelDIIS(z, self.scale, DIIS_LR)
            self.gradient.forget(new)  # z jumped: no difference spans the jump
            self.switched |= new
            for b in new.nonzero().view(-1).tolist():
                self.switch_iteration[b] = self.k
            self.any_switched = True

    def step(self, z: Tensor, ev, active: Tensor) -> None:
        improved = ev.pixel_mse < self.best_err
        torch.where(improved, ev.pixel_mse, self.best_err, out=self.best_err)
        if 0 < self.k <= EARLY_STEPS:  # z is the iterate ev was evaluated at (iterate 0 is E(x), the start)
            torch.where((improved & ~self.switched).view(self.view), z, self.restart, out=self.restart)
        self.k += 1
        self.best_db[self.k % (STALL + 1)] = psnr_from_mse(self.best_err)
        free = (~self.switched).view(self.view).to(z.dtype)
        if not self.all_switched:
            self.fixed_point.step(z, ev.residual, active * free)
        if self.gradient is not None and ev.pixel_grad is not None:
            self.gradient.step(z, ev, active * (1 - free))
        # last: a sample that switches now is at E(x) for the next evaluation, its first diis step
        if self.gradient_allowed and not self.all_done:
            self._switch(z, active)

    def summary(self) -> dict:
        """How the run went: per sample the iteration of the switch (None: gradient-free to the end),
        whether it stayed gradient-free because its decode reached the noise floor, whether gradient
        steps were allowed, the activation estimate against the cap, and whether the backward recomputed the decoder's
        blocks."""
        return {"switch_iteration": list(self.switch_iteration), "at_noise_floor": self.settled.tolist(),
                "gradient_allowed": self.gradient_allowed,
                "activation_estimate_mb": self.estimate_mb, "memory_limit_mb": self.limit_mb,
                "recomputed_blocks": self.recompute}
