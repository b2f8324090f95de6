"""The default's gradient rival (InversionOptions.rival): the samples the twin decided for, run again by a gradient
method with its own twin, from an early fixed-point iterate and then from the first run's pixel-best, and returned
where core.twin.rival_wins prefers the rival's pick (docs/convergence.md, "The rival" and the sections after it)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .codec import Codec
from .evaluation import REPORTED_RESIDUAL_EVERY
from .hybrid import backward_plan, memory_cap_mb
from .metrics import nmse_db
from .pick import twin_batch, twin_decided
from .rerun import left_of, merged, rerun, start_of
from .result import InversionResult
from .run import run
from .twin import off_pace, rival_wins
from .unstable import side_evaluations

if TYPE_CHECKING:
    from .solver import InversionOptions

Tensor = torch.Tensor
# InversionOptions.rival by the name users pick it by (node input, CLI flag): a method that steps on the pixel
# gradient, or "off"
RIVAL_NAMES = {"diis": "diis", "gradient": "gradient", "off": ""}
RIVALS = tuple(RIVAL_NAMES.values())
# The rival backpropagates its sample and its twin one after the other: each keeps the decoder activations of one
# image, as the gradient baseline on that image does (backpropagating the pair together kept twice that: 2.08x the
# gradient baseline's live-tensor peak at 512 px on the SD VAE, docs/measurements.md)
RIVAL_BACKWARD_ROWS = 1


def with_rival(first: InversionResult, codec: Codec, image: Tensor, opts: InversionOptions, callback,
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
    depend on the batch; this way each image's result is its own, and the activations are one sample's (and its
    twin's)."""
    rows = twin_decided(first)
    if not opts.rival or not rows or left_of(opts, first.seconds) <= 0:
        return first
    report = {"method": opts.rival, "candidates": rows, "samples": [], "chosen": [], "twin_nmse_db": [],
              "skipped": None, "outmatched": [], "twin_gain_db": [], "early_steps": opts.rival_early_steps,
              "recomputed_blocks": False,
              "from_pixel_best": {"samples": [], "chosen": [], "twin_nmse_db": [], "outmatched": [], "twin_gain_db": [],
                                  "off_pace": [], "unjudged": []}}
    _check_affordable(report, codec, first.latent[rows[0]:rows[0] + 1], opts)
    if report["skipped"]:
        return replace(first, extra=dict(first.extra, rival=report))
    # select "twin": the twin's pick even where the decode reaches the noise floor -- a gradient method gets there on
    # flat fields far from the truth (TAEF2 and kl-f8 flat_objects); record_every 0: the kept iterates test the
    # fixed-point iteration's assumption, which a gradient run has not; its residual only feeds the trace: every
    # REPORTED_RESIDUAL_EVERY-th (the same latent, ~25 % less time on TAEF2)
    rival_opts = replace(opts, method=opts.rival, lr=None, rival="", unstable_steps=0, select="twin", record_every=0,
                         residual_every=max(opts.residual_every, REPORTED_RESIDUAL_EVERY),
                         backward_rows=RIVAL_BACKWARD_ROWS,
                         checkpoint="on" if report["recomputed_blocks"] else "off")  # decided here, by its cap
    result = first
    for i in rows:
        ran, early_start, result = _early_rival(result, codec, image, i, opts, rival_opts, callback, weight, report)
        if ran and opts.rival_from_pixel_best:
            result = _rival_from_pixel_best(result, first, codec, image, i, opts, rival_opts, callback, weight,
                                            report, early_start)
    if report["from_pixel_best"]["chosen"]:  # "chosen": the returned latent is a rival's pick, from either start
        report["chosen"] = sorted(set(report["chosen"]) | set(report["from_pixel_best"]["chosen"]))
    result.extra["rival"] = report
    return result


def _check_affordable(report: dict, codec: Codec, z0: Tensor, opts: InversionOptions) -> None:
    """Set report["skipped"] (why) where the rival cannot run: no differentiable decoder, or its activations (one
    sample like `z0`: it backpropagates its sample and twin one after the other) above memory_limit_mb or, without a
    cap, the device's free memory, even with the decoder's blocks recomputed (opts.checkpoint; core.hybrid.backward_plan
    sets report["recomputed_blocks"])."""
    if codec.grad_decode is None:
        report["skipped"] = "no differentiable decoder"
        return
    # without a cap, the device's free memory: the rival is part of the default, and a backward pass of a full SD
    # decoder at 1024 px keeps ~27 GiB of activations, which a CPU host would not survive
    limit, whose = memory_cap_mb(opts.memory_limit_mb, z0.device), "limit" if opts.memory_limit_mb > 0 else "free"
    try:  # one row at a time (RIVAL_BACKWARD_ROWS): the sample's activations, then its twin's
        report["activation_estimate_mb"], report["recomputed_blocks"] = backward_plan(
            codec.differentiable_decode(), z0, limit, opts.checkpoint)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        # a decoder autograd cannot run here (a host whose model cannot be copied for it, docs/compat.md: newer
        # ComfyUI's dynamic VRAM): the rival is part of the default, so the run returns the fixed point's pick and
        # says why, where a gradient method the caller asked for raises
        report["skipped"] = f"no differentiable decoder here ({type(e).__name__}: {e})"
    if limit > 0 and report.get("activation_estimate_mb", 0) > limit:
        recomputed = ", its decoder's blocks recomputed" if report["recomputed_blocks"] else ""
        report["skipped"] = f"memory ({whose} {limit:.0f} MiB{recomputed})"


def _early_rival(result: InversionResult, codec: Codec, image: Tensor, i: int, opts: InversionOptions,
                 rival_opts: InversionOptions, callback, weight,
                 report: dict) -> tuple[bool, Tensor | None, InversionResult]:
    """(whether it ran: not without time left, its start (None: E(x)), `result` with sample i's rival from
    _early_start's iterate raced in)."""
    left = left_of(opts, result.seconds)
    if left <= 0:
        return False, None, result
    with side_evaluations():  # not the fixed-point run's iterates (a host tracing every decode skips them)
        start, start_s = _early_start(codec, image, i, opts, weight, left)
        if left - start_s <= 0:
            return False, start, result
        return True, start, _race_rival(result, codec, image, i, rival_opts, left - start_s, callback, weight, start,
                                        start_s, report)


def _rival_from_pixel_best(result: InversionResult, first: InversionResult, codec: Codec, image: Tensor, i: int,
                           opts: InversionOptions, rival_opts: InversionOptions, callback, weight, report: dict,
                           early_start: Tensor | None) -> InversionResult:
    """`result` with sample i's second rival, from the first run's pixel-best (its twin from its own), raced in at the
    early rival's pace; not run where the standing pick's twin did not stand for it (the twins cannot decide), where
    that start is the early rival's own (`early_start`; None: E(x)), or off pace (_off_pace_from)."""
    again, left = report["from_pixel_best"], left_of(opts, result.seconds)
    if left <= 0:
        return result
    if not result.extra["twin"][i]["faithful"]:
        again["unjudged"].append(i)
        return result
    with side_evaluations():
        start, start_s = _pixel_best_start(first, codec, image, i, opts, weight, left)
        if _same_start(start, early_start):  # the pixel-best is the early start: that rival ran
            return replace(result, seconds=result.seconds + start_s)
        pace = report["twin_gain_db"][-1] / opts.steps  # what the early diis run gained on this twin, per step
        if _off_pace_from(start, codec, image, i, result.extra["twin"][i], pace, opts.steps):
            again["off_pace"].append(i)
            return replace(result, seconds=result.seconds + start_s)
        if left - start_s <= 0:
            return result
        # its twin is judged along the whole path its start came by: on kl-f8 texture at 64 px the real run's
        # pixel-best gained 8.1 dB over E(x) where its twin's gained 25.3 (the first run's twin did not stand for it),
        # which a gain counted from the start (0 against 0 at a pick there) hides
        gains_from = torch.tensor([first.samples[i].psnr_initial, first.extra["twin"][i]["twin_psnr_initial"]])
        return _race_rival(result, codec, image, i, rival_opts, left - start_s, callback, weight, start, start_s,
                           again, gains_from, pace)


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
    second = rerun(result, codec, image, [i], rival_opts, left, callback, weight, race=race, start=start,
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
    return merged(result, second, [i], [0] if wins else [], {"rival": rival_opts.method}, start_s)


def _pixel_best_start(first: InversionResult, codec: Codec, image: Tensor, i: int, opts: InversionOptions, weight,
                      left: float) -> tuple[Tensor, float]:
    """(start, seconds): sample i's and its twin's pixel-best iterates of the first run, rows (2, ...). Taken from the
    first run where it ran this image alone; in a batch, from a run of the image alone (the first run's options), so
    that each image's result is its own (diis amplifies the rounding of batched convolutions)."""
    if len(first.samples) == 1 and first.pixel_best_rows is not None:
        return first.pixel_best_rows, 0.0
    w = weight if weight is None or weight.shape[0] == 1 else weight[i:i + 1]
    with torch.inference_mode():
        alone = run(codec, image[i:i + 1], replace(opts, rival="", unstable_steps=0,
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
        truth = start_of(codec, image, torch.tensor([i]))  # the twin's answer, E(x)
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
        pair, pair_weight, latents, _ = twin_batch(codec, image[i:i + 1], w, None, replace(opts, select="twin"),
                                                   "fixed_point")
        early_opts = replace(opts, steps=opts.rival_early_steps, select="pixel", rival="", unstable_steps=0,
                             record_every=0, time_budget=0.0 if math.isinf(left) else left)
        early = run(codec, pair, early_opts, None, latents, pair_weight)
    return early.latent, early.seconds
