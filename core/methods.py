"""The registry of `invert`'s methods: one entry per method, from which METHODS and DEFAULT_LR derive.

An entry names the method's family, its default step size and the factory of its stepper. The
family decides what `core.evaluation` computes at each iterate and what the stepper is given:

- "fixed_point": the latent residual E(D(z)) - E(x) (one decoder and one encoder forward, no
  autograd); the stepper's `step(z, residual, active)`.
- "gradient": the pixel-loss gradient d||D(z) - x||^2 / dz by autograd (the residual only for the
  trace); the stepper's `step(z, pixel_grad, active)`.
- "both": the whole `Evaluation` (the residual at every iterate, the pixel gradient and the pixel
  residual at the iterates where the stepper's `wants_pixel_grad(k)` returns True);
  `step(z, evaluation, active)`.
  For hybrids that mix or switch between the two directions.
- "pixel": what "gradient" computes plus the pixel residual sqrt(w) (D(z) - x); the stepper gets the
  whole `Evaluation` (for accelerations that mix iterates by their pixel residual: core.diis).

Adding a method is one entry in METHOD_REGISTRY.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from .codec import Codec
from .steppers import Adam, Anderson, Forward, InertialKM

if TYPE_CHECKING:
    from .solver import InversionOptions

Tensor = torch.Tensor
FAMILIES = ("fixed_point", "gradient", "both", "pixel")
PIXEL_ONLY_FAMILIES = ("gradient", "pixel")  # step on the pixel gradient alone (no encoder in the step)


@dataclass(frozen=True)
class StepSetup:
    """What a stepper factory may use. `z` is the solver's iterate (contiguous fp32, updated in
    place by the stepper), `scale` the RMS of E(x) per sample as (B, 1, ...), `lr` the options'
    step size or the method's default, `eps` the dtype's relative noise floor (1e-8 fp32, 1e-4 16-bit)."""

    z: Tensor
    scale: Tensor
    lr: float
    eps: float
    opts: "InversionOptions"
    codec: Optional[Codec] = None  # for methods that need it up front (hybrid: its noise floor, its decoder)
    image: Optional[Tensor] = None  # the target x (fp32), for methods that read its noise floor (hybrid)
    latent: Optional[Tensor] = None  # E(x) (fp32, never written), for methods that restart there (hybrid)


@dataclass(frozen=True)
class Method:
    family: str  # one of FAMILIES
    default_lr: float
    build: Callable[[StepSetup], object]  # -> a stepper with step(z, direction, active)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {self.family!r}")

    @property
    def needs_autograd(self) -> bool:
        return self.family != "fixed_point"

    @property
    def pixel_only(self) -> bool:
        """Steps on the pixel gradient alone: the latent residual is only for the trace."""
        return self.family in PIXEL_ONLY_FAMILIES


def _adam(s: StepSetup) -> Adam:
    return Adam(s.z, s.scale, s.lr, s.opts.steps, s.eps, schedule=s.opts.schedule)


def _diis(s: StepSetup):
    from .diis import PixelDIIS

    return PixelDIIS(s.z, s.scale, s.lr)


def _hybrid(s: StepSetup):
    from .hybrid import Hybrid, memory_cap_mb
    from .twin import decode_floor_psnr

    # the decoder copy for the memory estimate is built only when there is a cap to check
    cap = memory_cap_mb(s.opts.memory_limit_mb, s.z.device)
    decode_grad = s.codec.differentiable_decode() if cap > 0 else None
    # the noise floor it stays gradient-free at: a 16-bit codec's own where lower than the 8-bit one (core.twin)
    rows = s.opts.backward_rows
    return Hybrid(s.z, s.scale, s.lr, s.opts.memory, decode_floor_psnr(s.codec, s.image, s.latent), decode_grad, cap,
                  s.latent, s.opts.checkpoint, s.z[:rows] if rows > 0 else None)


METHOD_REGISTRY: dict[str, Method] = {
    "adam": Method("fixed_point", 0.01, _adam),  # the paper's: Adam moments on the residual
    "forward": Method("fixed_point", 0.5, lambda s: Forward(s.lr)),
    "km": Method("fixed_point", 0.5, lambda s: InertialKM(s.z, s.lr, s.opts.momentum)),
    "anderson": Method("fixed_point", 0.5, lambda s: Anderson(s.z, s.lr, s.opts.memory)),
    "gradient": Method("gradient", 0.01, _adam),  # the baseline: Adam on the pixel-loss gradient
    "diis": Method("pixel", 0.02, _diis),  # pixel-gradient steps mixed by their pixel residual (core.diis)
    "hybrid": Method("both", 0.5, _hybrid),  # anderson, then diis from an early iterate where it stalls below the floor
}
METHODS = tuple(METHOD_REGISTRY)
PIXEL_ONLY_METHODS = tuple(name for name, m in METHOD_REGISTRY.items() if m.pixel_only)
DEFAULT_LR = {name: m.default_lr for name, m in METHOD_REGISTRY.items()}
