"""One solver run: the loop of core.invert over a batch (and its twins), from the first evaluation to the
returned iterates. The reruns that may follow it (core.rerun, core.rival) call it again on some samples."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

import torch

from .checkpointing import recomputed_blocks
from .codec import Codec
from .evaluation import Backward, Target, direction, evaluator_for
from .hybrid import backward_activation_mb, memory_cap_mb
from .methods import METHOD_REGISTRY, StepSetup
from .metrics import psnr_from_mse
from .pick import select_picks, twin_batch
from .result import InversionResult, SampleStats
from .run_state import STOP_REASONS, HostSync, IterateLog, RunState
from .unstable import REFRESH_STEPS, project_off, side_evaluations, unstable_directions

if TYPE_CHECKING:
    from .solver import InversionOptions

Tensor = torch.Tensor


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
    """The finished loop's result: each sample's stats read from the trace, and its best iterate."""
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


def roundtrip(codec: Codec):
    """z -> E(D(z)) in fp32: what core.unstable's Arnoldi differentiates."""
    return lambda v: codec.encode(codec.decode(v.to(codec.dtype))).float()


def _gradient_memory(method, codec: Codec, z: Tensor, opts: InversionOptions) -> dict:
    """For a method stepping on the pixel gradient alone: whether its backward recomputes the decoder's blocks
    ({"recomputed_blocks", "activation_estimate_mb"}; {} where that is not decided here). "on" recomputes; "auto"
    where keeping one backward's activations (`backward_rows` rows of z) would exceed memory_limit_mb, else the
    device's free memory: unlike the hybrid and the rival such a method has no gradient-free way on, so it recomputes
    rather than run out of memory (and keeps, as autograd does, where the decoder has no blocks to recompute)."""
    if not method.pixel_only or opts.checkpoint == "off":
        return {}
    decode = codec.differentiable_decode()
    if recomputed_blocks(decode) == 0:
        return {}
    if opts.checkpoint == "on":
        return {"recomputed_blocks": True, "activation_estimate_mb": None}
    limit = memory_cap_mb(opts.memory_limit_mb, z.device)
    estimate = backward_activation_mb(decode, z[:opts.backward_rows] if opts.backward_rows > 0 else z)
    return {"recomputed_blocks": 0 < limit < estimate, "activation_estimate_mb": estimate}


def _pad_rows(a: Tensor, b: Tensor) -> Tensor:
    """Two (B, p, N) direction stacks as one batch, the shorter padded with zero rows."""
    p = max(a.shape[1], b.shape[1])

    def pad(t):
        return torch.cat([t, t.new_zeros(t.shape[0], p - t.shape[1], t.shape[2])], 1)
    return torch.cat([pad(a), pad(b)])


def run(codec: Codec, image: Tensor, opts: InversionOptions, callback, target_latent=None, weight=None,
        deflate: tuple[Tensor, list] | None = None, race: tuple[Tensor, Tensor, Tensor | None] | None = None,
        start: Tensor | None = None, origin_psnr: Tensor | None = None, settle: int = 0) -> InversionResult:
    """One run of opts.method on the batch `image` (with each sample's twin where the selection uses one, core.pick),
    from E(x) (or `target_latent`) to each sample's returned iterate.

    `deflate`: (directions, lowest Ritz real parts) of the real rows at E(x), from the restart's probe: project
    every fixed-point step off the round trip's expanding directions (core.unstable), where a twin is run; the
    twin rows' own are found here. `race`: a rival's, (the standing picks' twin errors in dB, whether each stood for
    its run, the twin pace it is held to or None) per sample (TwinTracker.race). `start`: the first iterate of every
    row, twins included (a rival's), instead of the target latent. `origin_psnr`: (2B,) PSNRs the twins' faithfulness
    counts gains from (a rival from the first run's pixel-best: E(x)'s and E(x_t)'s), instead of the first iterate's.
    `settle` > 0: a real row stops once its twin's latent error has not fallen for that many iterations
    (core.polish)."""
    started = time.perf_counter()
    method = METHOD_REGISTRY[opts.method]
    batch = image.shape[0]
    if deflate is not None:  # a restart: its twin image is not an iterate either (core.unstable.side_evaluations)
        with side_evaluations():
            image, weight, target_latent, twin = twin_batch(codec, image, weight, target_latent, opts, method.family)
    else:
        image, weight, target_latent, twin = twin_batch(codec, image, weight, target_latent, opts, method.family)
    if twin is not None and race is not None:
        twin.race(race[0], race[1], opts.steps, race[2])
    if twin is not None:
        twin.settle = settle
    if twin is not None and origin_psnr is not None:
        twin.origin_psnr = origin_psnr.to(device=image.device, dtype=torch.float32)
    target = Target.of(codec, image, weight, target_latent, method.needs_autograd)
    z = target.start()
    if start is not None:
        z.copy_(start)
    eps = 1e-8 if codec.dtype == torch.float32 else 1e-4
    stepper = method.build(StepSetup(z, target.scale, opts.step_size, eps, opts, codec, target.image, target.latent))
    # the hybrid decides by its memory estimate whether its backward recomputes the decoder's blocks
    memory = _gradient_memory(method, codec, z, opts)
    backward = Backward(opts.backward_rows, opts.checkpoint == "on" or getattr(stepper, "recompute", False)
                        or memory.get("recomputed_blocks", False))
    evaluate = evaluator_for(method, codec, target, z, stepper, opts.residual_every if opts.track_residual else 0,
                             backward)
    real_rows = batch if twin is not None else None
    state = RunState(z, opts, evaluate.tracks_residual, real_rows)
    expanding, lowest = None, None
    if deflate is not None and twin is not None and method.family == "fixed_point" and opts.unstable_steps > 0:
        with torch.inference_mode():  # the real rows' were found at this same E(x) by the probe: not again
            twin_dirs, twin_lowest = unstable_directions(roundtrip(codec), z[batch:], target.latent[batch:],
                                                         opts.unstable_steps)
            expanding, lowest = _pad_rows(deflate[0].to(z.device), twin_dirs), list(deflate[1]) + twin_lowest
            initial = [int(v.abs().sum(1).gt(0).sum()) for v in expanding.cpu()]
    log, sync = IterateLog(opts.record_every), HostSync(opts, callback, started, real_rows)
    for k in range(opts.steps + 1):
        ev = evaluate(k, z, with_grad=k < opts.steps)
        log.keep(k, z, ev)
        state.record_trace(k, ev)
        hold = outmatched = settled = None
        if twin is not None:
            twin.observe(k, z, state.active, ev.pixel_mse)
            hold, outmatched = twin.improved_within(k, opts.stall_steps), twin.outmatched(k, state.trace[0, :k + 1])
            settled = twin.settled(k)
        state.record(k, z, ev, hold, outmatched, settled)
        if sync(k, state):
            break
        step_direction = direction(method.family, ev)
        state.mask_stopped(step_direction)
        if expanding is not None:
            project_off(step_direction, expanding)
        stepper.step(z, step_direction, state.active_f)
        if expanding is not None and opts.unstable_refresh > 0 and k > 0 and k % opts.unstable_refresh == 0:
            with torch.inference_mode():
                expanding, _ = unstable_directions(roundtrip(codec), z, target.latent, REFRESH_STEPS)
    result = _result(state, log, k, opts, codec.dtype, time.perf_counter() - started)
    result.extra.update(getattr(stepper, "summary", dict)())  # e.g. the hybrid's switch and memory path
    result.extra.update(memory)
    if expanding is not None:  # per row (real, then twin): how many directions E(x)'s steps were projected off
        result.extra["expanding"] = initial
        result.extra["lowest_ritz"] = [round(x, 4) for x in lowest]
    if twin is not None:
        result = select_picks(result, twin, target.latent, opts.select == "auto")
    if opts.track_residual and opts.residual_stride > 1:  # after the twin's pick, which may not have been encoded
        result = _with_returned_residual(result, codec, target)
    result.seconds = time.perf_counter() - started
    return result
