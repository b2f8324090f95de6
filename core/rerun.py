"""Running some samples of a finished run again and merging their results into it, and the opt-in restart off
the round trip's expanding directions (InversionOptions.unstable_steps, core.unstable)."""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .codec import Codec
from .pick import twin_decided
from .result import InversionResult
from .run import roundtrip, run
from .unstable import unstable_directions

if TYPE_CHECKING:
    from .solver import InversionOptions

Tensor = torch.Tensor


def start_of(codec: Codec, image: Tensor, rows: Tensor) -> Tensor:
    """E(x) of the given samples (contiguous fp32 on the codec's device)."""
    x = image[rows.to(image.device)].to(device=codec.device, dtype=torch.float32)
    return codec.encode(x.to(codec.dtype)).float().contiguous()


def left_of(opts: InversionOptions, spent: float) -> float:
    """Seconds of the time budget a follow-up run may still use (inf: no budget)."""
    return opts.time_budget - spent if opts.time_budget > 0 else math.inf


def rerun(first: InversionResult, codec: Codec, image: Tensor, rows: list[int], opts: InversionOptions, left: float,
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

    return run(codec, image[idx], replace(opts, time_budget=0.0 if math.isinf(left) else left),
               None if callback is None else relay, None, sub_weight, **run_args)


def merged(first: InversionResult, second: InversionResult, rows: list[int], use: list[int], tag: dict,
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

    def grow(t):
        return torch.cat([t, torch.full((length - t.shape[0], t.shape[1]), math.nan, dtype=t.dtype)])
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


def restart_off_expanding(first: InversionResult, codec: Codec, image: Tensor, opts: InversionOptions, callback,
                          weight) -> InversionResult:
    """The samples whose returned iterate the twin chose (their decode stayed below the noise floor), run again
    from E(x) with every step projected off the round trip's expanding directions (core.unstable); where the
    Arnoldi steps at E(x) found any, that run's twin pick is returned instead (its iterations go on in the sample's
    trace column, merged)."""
    redo, left = twin_decided(first), left_of(opts, first.seconds)
    if opts.unstable_steps == 0 or not redo or left <= 0:
        return first
    start = time.perf_counter()
    with torch.inference_mode():  # which of them expand at E(x) at all: only those are restarted
        at = torch.tensor(redo, device=first.latent.device)
        z0 = start_of(codec, image, at)
        found, lowest = unstable_directions(roundtrip(codec), z0, z0, opts.unstable_steps)
    counts = [int(v.abs().sum(1).gt(0).sum()) for v in found.cpu()]
    probe_s = time.perf_counter() - start
    keep = [j for j, c in enumerate(counts) if c > 0]
    redo = [redo[j] for j in keep]
    left -= probe_s
    if not redo or left <= 0:
        return replace(first, seconds=first.seconds + probe_s)
    second = rerun(first, codec, image, redo, opts, left, callback, weight,
                   deflate=(found[torch.tensor(keep, device=found.device)], [lowest[j] for j in keep]))
    use = [j for j in range(len(redo)) if second.extra["expanding"][j] > 0]
    result = merged(first, second, redo, use, {"restart": True}, probe_s)
    result.extra["unstable"] = [{"restarted": False, "directions": 0} for _ in first.samples]
    for j, i in enumerate(redo):
        result.extra["unstable"][i] = {"restarted": j in use, "directions": second.extra["expanding"][j],
                                       "lowest_ritz": second.extra["lowest_ritz"][j]}
    return result
