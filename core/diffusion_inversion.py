"""Inverting a deterministic diffusion sampler: from a final latent back to its initial noise.

Everything runs in the sampler's own state space (ComfyUI's, which is k-diffusion's): a
*denoiser* D(x, sigma) returns the model's clean-latent estimate x0 for the state x at noise
level sigma, and

* eps- and v-prediction models live in the variance-exploding form x = x0 + sigma * eps (the
  model sees x / sqrt(1 + sigma^2)); the DDIM update is exactly an Euler step of the
  probability-flow ODE in this form;
* flow models (rectified flow, SD3/FLUX) live in x = (1 - sigma) * x0 + sigma * eps, and the
  deterministic flow sampler is the Euler step of dx/dsigma = eps - x0.

In both forms the step from sigma to sigma' < sigma is the same formula

    x' = x + (sigma' - sigma) * e(x, sigma),   e(x, sigma) = (x - D(x, sigma)) / sigma      (1)

(for flow models e = eps - x0 is the velocity; for eps models e = eps). So one Euler/DDIM
sampler and one inversion serve all three; the model type only changes D, which the host
computes, and how the noise was scaled into the first state (`noise_scale`).

Inversion walks (1) backwards. Given x' at sigma', the exact previous state solves

    x = x' + (sigma - sigma') * e(x, sigma)                                                  (2)

an implicit (backward Euler) equation in x:

* ``naive`` (DDIM inversion) evaluates the right side once at the known point, e(x', sigma):
  one model call per step, with an O(step^2) error that accumulates over the steps;
* ``exact`` (Hong et al., CVPR 2024, "On Exact Inversion of DPM-Solvers") solves (2) by
  fixed-point iteration x <- x' + (sigma - sigma') * e(x, sigma), starting from the naive
  step. The residual of an iterate, ||x - (sigma - sigma') e(x, sigma) - x'||, is how far
  its forward step lands from x'; it comes for free with the next iterate, so the iterate with
  the smallest residual is kept (per sample) and the loop stops once it is below `tolerance`
  (relative to ||x'||) or after `iterations` refinements.

The initial state of a text-to-image run is the noise n scaled by `noise_scale`: sigma_max * n
for eps/v models (sqrt(1 + sigma_max^2) * n when sigma_0 is the model's maximum, as ComfyUI
does), sigma_0 * n for flow models (sigma_0 = 1: the state is the noise).

    >>> import torch
    >>> def denoise(x, sigma):            # a toy denoiser: shrinks towards 0.5
    ...     s = sigma.view(-1, 1, 1, 1)
    ...     return (x + 0.5 * s ** 2) / (1 + s ** 2)
    >>> sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0])
    >>> noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    >>> latent = sample_euler(denoise, noise, sigmas)
    >>> exact = invert_euler(denoise, latent, sigmas, mode="exact", iterations=50, tolerance=1e-7)
    >>> naive = invert_euler(denoise, latent, sigmas, mode="naive")
    >>> bool((exact.x - noise).abs().max() < 1e-3 < (naive.x - noise).abs().max())
    True
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

MODES = ("naive", "exact")
KINDS = ("eps", "v", "flow")

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma of shape (B,)) -> x0


def _e(denoise: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    s = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
    return (x - denoise(x, s)) / sigma


def check_sigmas(sigmas) -> torch.Tensor:
    """1-D, finite, >= 2 entries, strictly decreasing, sigma_0 > 0, none negative; or ValueError."""
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas: need a 1-D schedule of at least 2 noise levels (1 step); got shape "
                         f"{tuple(sigmas.shape)}. Use steps >= 1.")
    s = sigmas.detach().double().cpu()
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("sigmas: must be finite and >= 0; fix the node that made the schedule.")
    if not (s[1:] < s[:-1]).all():
        raise ValueError("sigmas: must decrease strictly, as a sampler's schedule does (highest noise first); "
                         "do not flip or repeat entries.")
    return sigmas


def noise_scale(sigma0: float, kind: str, max_denoise: bool = True) -> float:
    """Factor between the initial noise and the sampler's first state for a text-to-image run.

        >>> round(noise_scale(14.6146, "eps"), 4), noise_scale(1.0, "flow")
        (14.6488, 1.0)
    """
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "flow":
        return float(sigma0)
    return math.sqrt(1.0 + sigma0 ** 2) if max_denoise else float(sigma0)


def sample_euler(denoise: Denoiser, x: torch.Tensor, sigmas, callback=None) -> torch.Tensor:
    """The deterministic Euler/DDIM sampler, step (1), from sigmas[0] to sigmas[-1]."""
    sigmas = check_sigmas(sigmas).tolist()
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x = x + (s_next - s) * _e(denoise, x, s)
        if callback is not None:
            callback(i + 1, len(sigmas) - 1)
    return x


@dataclass
class StepStats:
    sigma_from: float     # the known, lower noise level
    sigma_to: float       # the recovered, higher one
    evaluations: int      # model calls spent on this step
    residual: list[float] | None = None  # per sample, relative; None in naive mode (not measured)


@dataclass
class DiffusionInversionResult:
    x: torch.Tensor                 # the state at sigmas[0]
    mode: str
    steps: list[StepStats] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return sum(s.evaluations for s in self.steps)

    def worst_residual(self) -> float | None:
        vals = [r for s in self.steps if s.residual for r in s.residual]
        return max(vals) if vals else None

    @property
    def latent(self) -> torch.Tensor:
        """The Result protocol's name for the recovered state."""
        return self.x

    def to_dict(self) -> dict:
        """JSON-ready: mode and per-step statistics (the state itself stays a tensor)."""
        return {"kind": "diffusion_inversion", "mode": self.mode, "evaluations": self.evaluations,
                "worst_residual": self.worst_residual(), "steps": [asdict(s) for s in self.steps]}

    def summary(self) -> str:
        line = f"{self.mode} inversion: {len(self.steps)} steps, {self.evaluations} model evaluations"
        worst = self.worst_residual()
        if worst is not None:
            line += f"; worst relative step residual {worst:.2e}"
        return line


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.float().pow(2).flatten(1).mean(1).sqrt()


def invert_euler(denoise: Denoiser, x: torch.Tensor, sigmas, mode: str = "exact", iterations: int = 10,
                 tolerance: float = 1e-4, callback=None) -> DiffusionInversionResult:
    """Recover the state at sigmas[0] from `x`, the sampler's output at sigmas[-1] (see module doc).

    `callback(done, total, stats)` runs after every step (progress, cancellation).
    """
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "exact" and (not isinstance(iterations, int) or iterations < 1):
        raise ValueError(f"iterations: exact mode needs >= 1 fixed-point refinement per step; got {iterations!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance: must be >= 0 (0 = always run every refinement); got {tolerance}")
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"latent: expected a batch (B, ...); got {getattr(x, 'shape', type(x))}")
    sig = check_sigmas(sigmas).tolist()
    result = DiffusionInversionResult(x=x, mode=mode)
    total = len(sig) - 1
    view = (-1,) + (1,) * (x.ndim - 1)
    for n, i in enumerate(range(total, 0, -1)):
        s_low, s_high = sig[i], sig[i - 1]
        h = s_high - s_low
        x_low = x
        x = x_low + h * _e(denoise, x_low, s_high)  # naive / DDIM inversion step
        stats = StepStats(s_low, s_high, 1)
        if mode == "exact":
            scale = _rms(x_low).clamp_min(1e-12)
            best = x.clone()
            best_res = torch.full((x.shape[0],), float("inf"), device=x.device)
            current = x
            for _ in range(iterations):
                following = x_low + h * _e(denoise, current, s_high)
                stats.evaluations += 1
                res = _rms(current - following) / scale  # forward(current) - x_low, relative
                better = res < best_res
                best = torch.where(better.view(view), current, best)
                best_res = torch.where(better, res, best_res)
                current = following
                if bool((best_res <= tolerance).all()):
                    break
            x = best
            stats.residual = [float(r) for r in best_res]
        result.steps.append(stats)
        if callback is not None:
            callback(n + 1, total, stats)
    result.x = x
    return result
