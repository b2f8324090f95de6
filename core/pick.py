"""Which iterate a fixed-point run returns (core.twin): the batch with each sample's twin appended, and the
rules that pick a real sample's iterate from its twin's record once the run is over."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .codec import Codec
from .result import InversionResult
from .twin import FLOOR_MARGIN_DB, TwinTracker, twin_faithful, twin_floors_psnr, twin_of

if TYPE_CHECKING:
    from .solver import InversionOptions

Tensor = torch.Tensor


def twin_batch(codec: Codec, image: Tensor, weight, target_latent, opts: InversionOptions, family: str):
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
    if opts.select == "auto":
        floor, twin_floor = twin_floors_psnr(codec, x, truth, x_t)
    else:
        floor = twin_floor = torch.full((x.shape[0],), math.inf)
    with torch.inference_mode():
        latents = torch.cat([latent, codec.encode(x_t.to(codec.dtype)).float()])
    if weight is not None and weight.shape[0] == x.shape[0] > 1:
        weight = torch.cat([weight, weight])
    return torch.cat([x, x_t]), weight, latents, TwinTracker(truth, floor.to(codec.device), twin_floor.to(codec.device))


def select_picks(result: InversionResult, tracker: TwinTracker, start_latent: Tensor, auto: bool) -> InversionResult:
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
    twin_near_k = near_k[b:]
    twin_psnr0 = result.trace_psnr[0, b:].tolist()  # E(x_t)'s: where a later rival's twin gains count from
    result.extra["twin"] = [{"iteration": k, "latent_nmse_db": round(d, 2), "floor_psnr": round(f, 2), "why": w,
                             "faithful": ok, "twin_psnr_initial": p0, "latent_nmse_start_db": round(d0, 2),
                             "twin_noise_level_iteration": tk}
                            for k, d, f, w, ok, p0, d0, tk in zip(twin_k, twin_db, floors, why, faithful, twin_psnr0,
                                                                  start_db, twin_near_k)]
    return replace(result, latent=latent, samples=samples, trace_psnr=trace_psnr, trace_residual_db=trace_res,
                   pixel_best_rows=result.latent, noise_level_rows=tracker.near_z)


TWIN_DECIDED = ("twin", "decoded worse", "pixel best first")  # select_picks' rules below the noise floor


def twin_decided(first: InversionResult) -> list[int]:
    """The samples whose returned iterate the twin chose: their decode stayed below the noise floor."""
    return [i for i, t in enumerate(first.extra.get("twin") or []) if t["why"] in TWIN_DECIDED]
