"""What `invert` measures at each iterate, per method family (core.methods): the pixel error
(which picks the best iterate), the latent residual E(D(z)) - E(x), and the pixel-loss gradient."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .checkpointing import recomputing
from .codec import Codec
from .methods import Method
from .metrics import PixelError, check_decoded_size, per_sample_norm, per_sample_weighted_mse, ratio_db

Tensor = torch.Tensor
# Hosts that only show the gradient methods' residual (the nodes' plot, the CLI's report) encode every 4th
# iterate: 0.73-0.88 of the time on TAEF2, the same latent (bench/results/2026-12-03-cpu-residual-every.md)
REPORTED_RESIDUAL_EVERY = 4


@dataclass
class Target:
    """What every iterate is measured against: the image x (fp32 on the codec's device), its
    optional pixel weight, the target latent E(x) (contiguous fp32), its norm and the per-sample
    RMS scale of E(x) as (B, 1, ...), which Adam-type steps are relative to."""

    image: Tensor
    weight: Optional[Tensor]
    latent: Tensor
    latent_norm: Tensor
    scale: Tensor

    @classmethod
    def of(cls, codec: Codec, image: Tensor, weight: Optional[Tensor], latent: Optional[Tensor],
           autograd: bool) -> "Target":
        x = image.to(device=codec.device, dtype=torch.float32)
        if weight is not None:
            weight = weight.to(device=codec.device, dtype=torch.float32)
        with torch.inference_mode():  # the encoder never needs autograd, not even for "gradient"
            e0 = (codec.encode(x.to(codec.dtype)) if latent is None else latent.to(codec.device)).float()
        e0 = e0.contiguous()  # conv outputs may be channels-last; the steppers expect plain layout
        e0_norm = per_sample_norm(e0).clamp_min(1e-12)
        scale = (e0_norm / e0[0].numel() ** 0.5).clamp_min(1e-6).view((e0.shape[0],) + (1,) * (e0.ndim - 1))
        if autograd:  # autograd needs ordinary tensors even when the host runs us under inference_mode
            with torch.inference_mode(False):
                x, e0, e0_norm, scale = (t.clone() for t in (x, e0, e0_norm, scale))
                weight = None if weight is None else weight.clone()
        return cls(x, weight, e0, e0_norm, scale)

    def residual_db(self, residual: Tensor) -> Tensor:
        """(b,) ||residual|| / ||E(x)|| in dB, for a residual E(D(z)) - E(x) of the first b rows (all, or a twin
        batch's real ones)."""
        return ratio_db(per_sample_norm(residual), self.latent_norm[:residual.shape[0]])

    def start(self) -> Tensor:
        """A fresh copy of the target latent, the first iterate; an ordinary tensor when the
        target's are (autograd), even under the host's inference_mode."""
        with torch.inference_mode(self.latent.is_inference()):
            return self.latent.clone()


@dataclass(frozen=True)
class Backward:
    """How a gradient step's backward runs: `rows` samples at a time (0: the whole batch), and whether the decoder's
    blocks are recomputed instead of kept (core.checkpointing; a decoder without recomputable blocks keeps them)."""

    rows: int = 0
    recompute: bool = False


@dataclass
class Evaluation:
    """One iterate z_k, measured; the tensors are (B,) per sample unless noted."""

    pixel_mse: Tensor  # weighted MSE of D(z_k) against x
    residual_db: Tensor  # ||E(D(z_k)) - E(x)|| / ||E(x)|| in dB; NaN where not computed
    residual: Optional[Tensor] = None  # E(D(z_k)) - E(x), latent-shaped; None where not computed
    pixel_grad: Optional[Tensor] = None  # d sum(pixel_mse) / dz at z_k, latent-shaped; None unless asked
    pixel_residual: Optional[Tensor] = None  # sqrt(weight) (D(z_k) - x), image-shaped; with pixel_grad (not "gradient")


def pixel_gradient(decode: Callable[[Tensor], Tensor], z: Tensor, target: Target, with_grad: bool,
                   backward: Backward = Backward()) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(D(z), pixel MSE, its gradient in z or None) with a differentiable decoder. `backward.rows` > 0: backpropagate
    that many samples at a time -- the loss is a sum over samples, so each one's gradient is its own (equal up to the
    rounding of batched convolutions), and only those rows' activations are kept at once; `backward.recompute`:
    the decoder's blocks recompute theirs in the backward (the same gradient)."""
    batch, rows = z.shape[0], backward.rows
    with recomputing(backward.recompute):
        if rows <= 0 or rows >= batch:
            return _pixel_gradient(decode, z, target.image, target.weight, with_grad)
        parts = [_pixel_gradient(decode, z[s:s + rows], target.image[s:s + rows], _rows(target.weight, s, rows),
                                 with_grad) for s in range(0, batch, rows)]
    images, errs, grads = zip(*parts)
    return torch.cat(images), torch.cat(errs), torch.cat(grads) if with_grad else None


def _rows(weight: Optional[Tensor], start: int, rows: int) -> Optional[Tensor]:
    """Rows start:start + rows of a pixel weight (B or 1, 1, H, W); one weight for every sample as it is."""
    return weight if weight is None or weight.shape[0] == 1 else weight[start:start + rows]


def _pixel_gradient(decode: Callable[[Tensor], Tensor], z: Tensor, image: Tensor, weight: Optional[Tensor],
                    with_grad: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    with torch.inference_mode(False), torch.enable_grad():
        zg = z.detach().requires_grad_(True)
        decoded = decode(zg)
        check_decoded_size(decoded, image)  # where the decode first meets x: a clear error, not a broadcast one
        err = per_sample_weighted_mse(decoded, image, weight)
        grad = torch.autograd.grad(err.sum(), zg)[0] if with_grad else None
    return decoded.detach(), err.detach(), grad


class FixedPointEvaluator:
    """Families "fixed_point" and "both": decode and encode every iterate for the residual, which is
    written into one buffer allocated once (no latent-sized allocation per iteration).

    `wants_pixel_grad(k)` (family "both", None otherwise): at the iterates where it returns True the
    decode goes through the differentiable decoder instead, so the pixel gradient costs one
    backward more and no extra forward; the pixel residual comes with it. `wants_residual(k)`
    (None: always): where it returns False the encode is skipped (residual None, residual_db NaN)."""

    tracks_residual = True

    def __init__(self, codec: Codec, target: Target, z: Tensor,
                 wants_pixel_grad: Optional[Callable[[int], bool]] = None,
                 wants_residual: Optional[Callable[[int], bool]] = None, backward: Backward = Backward()):
        self.codec, self.target, self.wants_pixel_grad = codec, target, wants_pixel_grad
        self.backward = backward
        self.wants_residual = wants_residual
        self.pixel_error = PixelError(target.image, target.weight)
        self.residual = torch.empty_like(target.latent)
        # the codec's dtype copy of z; in fp32 the iterate itself
        self.z_in = z if codec.dtype == torch.float32 else torch.empty_like(z, dtype=codec.dtype)
        self.decode_grad = codec.differentiable_decode() if wants_pixel_grad is not None else None
        self.pixel_residual = (PixelError(target.image, target.weight, in_place=False).residual
                               if wants_pixel_grad is not None else None)  # only with the pixel gradient

    def __call__(self, k: int, z: Tensor, with_grad: bool) -> Evaluation:
        codec, grad, pixels = self.codec, None, None
        if self.decode_grad is not None and with_grad and self.wants_pixel_grad(k):
            image, err, grad = pixel_gradient(self.decode_grad, z, self.target, True, self.backward)
            pixels = self.pixel_residual(image)
            image = image.to(codec.dtype)
        else:
            with torch.inference_mode():
                if self.z_in is not z:
                    self.z_in.copy_(z)
                image = codec.decode(self.z_in)
                if k == 0:  # E(x)'s decode, once per run (the twin's runs checked it in core.twin.twin_of)
                    check_decoded_size(image, self.target.image)
                err = self.pixel_error(image)
        if self.wants_residual is not None and not self.wants_residual(k):
            return Evaluation(err, torch.full_like(err, float("nan")), None, grad, pixels)
        with torch.inference_mode():
            residual = torch.sub(codec.encode(image), self.target.latent, out=self.residual)
            res_db = self.target.residual_db(residual)
        return Evaluation(err, res_db, residual, grad, pixels)


class PixelGradientEvaluator:
    """Families "gradient" and "pixel": the pixel-loss gradient by autograd through the differentiable
    decoder (and for "pixel" the pixel residual); the latent residual (one encode more) only with
    `track_residual` (every `residual_every`-th iterate; 0: none), and always at k = 0 for the trace."""

    def __init__(self, codec: Codec, target: Target, residual_every: int, keeps_pixel_residual: bool = False,
                 backward: Backward = Backward()):
        self.codec, self.target, self.backward = codec, target, backward
        self.tracks_residual, self.residual_every = residual_every > 0, max(residual_every, 1)
        # sqrt(w) (D(z) - x) for family "pixel"; not in place: the stepper keeps it past the next call
        self.pixel_error = PixelError(target.image, target.weight, in_place=False) if keeps_pixel_residual else None
        self.decode = codec.differentiable_decode()
        with torch.inference_mode():  # one residual buffer for the whole run, as FixedPointEvaluator's
            self.residual = torch.empty_like(target.latent)

    def __call__(self, k: int, z: Tensor, with_grad: bool) -> Evaluation:
        image, err, grad = pixel_gradient(self.decode, z, self.target, with_grad, self.backward)
        pixels = self.pixel_error.residual(image) if self.pixel_error is not None else None
        if not (k == 0 or (self.tracks_residual and k % self.residual_every == 0)):
            return Evaluation(err, torch.full_like(err, float("nan")), None, grad, pixels)
        with torch.inference_mode():
            residual = torch.sub(self.codec.encode(image.to(self.codec.dtype)).float(), self.target.latent,
                                 out=self.residual)
            res_db = self.target.residual_db(residual)
        return Evaluation(err, res_db, residual, grad, pixels)


def evaluator_for(method: Method, codec: Codec, target: Target, z: Tensor, stepper, residual_every: int,
                  backward: Backward = Backward()):
    """The evaluator of a method's family (core.methods.FAMILIES) for this run. `residual_every`: encode
    every n-th iterate for the trace where the step does not need it (0: only the first); `backward`: how a gradient
    step's backward runs (pixel_gradient)."""
    if method.pixel_only:
        return PixelGradientEvaluator(codec, target, residual_every, keeps_pixel_residual=method.family == "pixel",
                                      backward=backward)
    if method.family != "both":
        return FixedPointEvaluator(codec, target, z)
    # a stepper with `wants_residual` (the hybrid's gradient phase) may not need the encode: then it is
    # for the trace only; without it the stepper needs the residual at every iterate
    step_wants = getattr(stepper, "wants_residual", None)
    wants_residual = None if residual_every == 1 or step_wants is None else (
        lambda k: step_wants(k) or (residual_every > 0 and k % residual_every == 0))
    return FixedPointEvaluator(codec, target, z, stepper.wants_pixel_grad, wants_residual, backward)


def direction(family: str, evaluation: Evaluation):
    """What a stepper of this family steps along: the residual, the pixel gradient, or (families
    "both" and "pixel") the whole evaluation."""
    if family == "fixed_point":
        return evaluation.residual
    if family == "pixel":  # the residual is the trace's (an inference tensor): not the stepper's to see
        return replace(evaluation, residual=None)
    return evaluation.pixel_grad if family == "gradient" else evaluation
