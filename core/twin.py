"""Which iterate to return: the twin problem that picks the stopping iteration (issue 12).

Why (docs/convergence.md): with an encoder that is not the decoder's inverse (TAEF2), the
fixed-point iterates keep lowering the pixel error while their latent drifts away from the true
one along directions the decoder barely responds to. Like Landweber iteration on an ill-posed
problem they semi-converge: the latent error falls for a few steps, then rises. The pixel error
cannot see where; a problem whose answer is known can. The twin of image x is the paper's protocol
applied to x itself: truth z_t = E(x), image x_t = D(z_t) (8-bit rounded when x is 8-bit). It is
run in the same batch with the same method and steps, and each real sample keeps its iterate at
the iteration where its twin's latent error was lowest.

Selection `auto` uses the twin only where the pixel error cannot decide: a sample whose decode
reached the input's noise floor (8-bit rounding, or a 16-bit codec's own where lower: precision_floor_psnr;
within FLOOR_MARGIN_DB) has found a latent that
explains x to within its noise, and returns the first iterate within FLOOR_NEAR_DB of that floor
(the discrepancy principle), or its best pixel iterate where none got that close; the others
return the twin's choice (E(x) if that decodes worse), or the pixel-best where the twin's choice came after it
(past the pixel-best the decode only got worse). Either way the returned iterate is never worse in pixels than E(x).
Opt-in (core.solver's unstable_steps > 0): a sample the twin decided for is run once more from E(x) where the
round trip expands at E(x) (core.unstable), with its steps projected off those directions, and the restart's twin
choice (again never worse in pixels than E(x)) is returned. The default's
rival (core.solver's `rival`): a sample the twin decided for is also run by `diis` with its own twin, from the
pixel-best of E(x) and the first fixed-point step (core.solver's rival_early_steps; 0: from E(x)), and
rival_wins keeps the run whose twin stood for it (twin_faithful), else the one whose twin got closer to E(x).

    >>> import torch
    >>> noise_floor_psnr(torch.full((1, 3, 4, 4), 128 / 255)).round().tolist()
    [59.0]
    >>> noise_floor_psnr(torch.full((1, 3, 4, 4), 0.3)).tolist()  # not 8-bit: no known floor
    [inf]
"""
from __future__ import annotations

import math

import torch

from .codec import Codec
from .metrics import check_decoded_size, psnr_from_mse
from .unstable import side_evaluations

Tensor = torch.Tensor
SELECTIONS = ("auto", "pixel", "twin")
FLOOR_MARGIN_DB = 1.0  # a decode within this of the noise floor explains x (kl-f8 reached 0.3 dB of it)
# At the floor the pixel error cannot rank the iterates, and the iteration goes on fitting x's rounding noise
# while the latent drifts (kl-f8 rocket: -42.8 dB at iteration 30, -35.5 at 100). The discrepancy principle
# returns the first iterate that explains x to its noise level: on the anderson traces at 64 and 32 px
# (bench.floor_rules) 0.02 dB beat the pixel-best on 6 of 14 floor cells by 0.25-2.6 dB and lost 0.42 on one;
# 0.1 dB and more were worse than the pixel-best on most cells (the floor is an estimate).
FLOOR_NEAR_DB = 0.02
QUANT_MSE = (1 / 255) ** 2 / 12  # the error variance of rounding to 8 bits
# twin_faithful: a settled run that gained less than this share of its twin's pixel gain (dB) was not stood for by
# it. Set in session 6 on the 64 px probes (kl-f8 texture 0.28, the next lowest 0.63) and since measured on 32 px
# held-out runs and on the diis rival's runs (0.60-1.18).
FAITHFUL_GAIN = 0.5
SETTLE_STEPS = 20  # ... judged only once it had settled: its best PSNR gained less than SETTLED_GAIN_DB over this
SETTLED_GAIN_DB = 1.0  # many iterations (auto-stop's flatness threshold); a diis run on a real photo creeps on slowly
# (a run of SETTLE_STEPS to 2 * SETTLE_STEPS iterations: over its second half; a shorter one is never judged)
# TwinTracker.outmatched: a rival whose twin, improving for the rest of the run at this many times its rate over the
# last SETTLE_STEPS iterations, would still not get closer to its answer than the first run's twin cannot win and is
# stopped. Offline on the diis rival's twin curves (64 px, 18 paper-protocol pairs and the 8 photos' twins) 2x, 3x and
# 5x stopped no rival that won; in the solver, 3x stopped every rival that lost on the 64 and 32 px bench cells and
# photos, always with the same latent as the whole race (docs/convergence.md, "The rival's race").
CATCH_UP = 3.0
# ... and only where that projection stays more than this behind: closer than that the race is too close to call from
# a rate. Since the rival starts from the first fixed-point step (session 15), its twin can sit flat for 35 iterations
# and then win by 0.13 dB (TAEF2 rocket, 64 px: -15.68 dB flat from iteration 20 to 55, -16.16 at 100 against the first
# run's -16.03; the race had stopped it at 21, returning a decode 18 dB worse than the full run's).
TOO_CLOSE_DB = 0.5


def off_pace(now_db: Tensor, pace_db: Tensor, steps_left: int, to_beat_db: Tensor) -> Tensor:
    """(B,) True where a rival's twin, its latent error at `now_db`, gaining `pace_db` dB per iteration for its
    `steps_left` iterations, would still stay more than TOO_CLOSE_DB above `to_beat_db` (the standing pick's twin).
    The pace is the early rival's on the same twin (its twin's whole gain, spread over the steps a run may take): what
    a diis run did on this problem, which a rival from the first run's pixel-best may do again -- its twin can sit
    flat for 20 iterations and then gain 2.5 dB (kl-f8 flat_noise at 128 px), which no rate over the last
    SETTLE_STEPS foresees.

    >>> off_pace(torch.tensor([-23.83, -6.67]), torch.tensor([0.0195, 0.0621]), 100, torch.tensor([-25.47, -14.01]))
    tensor([False,  True])
    """
    return now_db - pace_db * steps_left > to_beat_db + TOO_CLOSE_DB


def is_8bit(x: Tensor) -> Tensor:
    """(B,) True where every value of the sample lies on the 8-bit grid (as loaded from a PNG)."""
    flat = x.reshape(x.shape[0], -1).float() * 255
    return ((flat - flat.round()).abs() <= 1e-3).all(1)


def noise_floor_psnr(x: Tensor) -> Tensor:
    """(B,) PSNR (dB) of the rounding error of an 8-bit sample: the most a latent can explain of it.
    Pixels at exactly 0 or 1 may be clipped decodes, which rounding does not change; inf where the
    sample is not 8-bit (no known floor)."""
    flat = x.reshape(x.shape[0], -1)
    inner = ((flat > 0) & (flat < 1)).float().mean(1).clamp_min(1e-6)
    psnr = psnr_from_mse(QUANT_MSE * inner)
    return torch.where(is_8bit(x), psnr, torch.full_like(psnr, math.inf))


def precision_floor_psnr(codec: Codec, truth: Tensor, x_t: Tensor) -> Tensor:
    """(B,) PSNR (dB) a 16-bit codec's decode cannot beat at the twin: its truth z_t moved uniformly within half a
    unit in the last place of the codec's dtype (the cell a latent rounds into when it is decoded) and decoded,
    against x_t. The 8-bit floor does not apply alone there: the codec's own rounding stops every method first
    (kl-f8 in bf16 at 64 px: the fixed point ended at 53.9-54.7 dB on the images where fp32 reaches the 59 dB
    floor, this estimate 54.0-55.2 dB; docs/convergence.md, "16-bit"). Seeded, so a sample's floor is the same on
    every run. Only for 16-bit codecs (decode_floor_psnr): an fp32 latent's cell is too fine to matter.

    >>> from core import Codec
    >>> codec = Codec(lambda x: x, lambda z: z, dtype=torch.bfloat16)
    >>> x_t = torch.full((1, 3, 4, 4), 128 / 255)
    >>> 50 < precision_floor_psnr(codec, x_t, x_t).item() < 60  # bf16 keeps 8 bits of mantissa
    True
    """
    half_ulp = torch.finfo(codec.dtype).eps / 2
    g = torch.Generator().manual_seed(0)
    u = (torch.rand(truth.shape, generator=g) * 2 - 1).to(truth.device)
    with torch.inference_mode(), side_evaluations():  # not an iterate (a host tracing every decode skips it)
        moved = codec.decode((truth * (1 + half_ulp * u)).to(codec.dtype)).float()
    return psnr_from_mse((moved - x_t).square().flatten(1).mean(1))


def decode_floor_psnr(codec: Codec, x: Tensor, latent: Tensor, x_t: Tensor | None = None,
                      own: Tensor | None = None) -> Tensor:
    """(B,) the noise floor a decode of x is judged by (selection auto, the hybrid's switch): the 8-bit one of x, or a
    16-bit codec's own where lower (precision_floor_psnr at the twin of x; `latent` E(x), `x_t` its twin image if
    already decoded; `own` that floor if already computed)."""
    floor = noise_floor_psnr(x)
    if codec.dtype == torch.float32:
        return floor
    if own is None:
        if x_t is None:
            with side_evaluations():  # a setup decode, not an iterate
                x_t, _ = twin_of(codec, x, latent)
        own = precision_floor_psnr(codec, latent, x_t)
    return torch.minimum(floor, own)


def twin_floors_psnr(codec: Codec, x: Tensor, latent: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
    """decode_floor_psnr of x and of its twin image x_t (each (B,)), a 16-bit codec's own floor computed once for both
    (it is the twin's: E(x) moved within its rounding and decoded, against x_t)."""
    own = None if codec.dtype == torch.float32 else precision_floor_psnr(codec, latent, x_t)
    return decode_floor_psnr(codec, x, latent, own=own), decode_floor_psnr(codec, x_t, latent, own=own)


def twin_faithful(trace_psnr: Tensor, samples: list, picks: list[int], origin: Tensor | None = None) -> list[bool]:
    """Per real sample of a twin batch (trace columns :B real, B: twins; `samples` the batch's stats before
    selection): whether its twin stood for it. Not, where the real run had settled (its best PSNR gained less than
    SETTLED_GAIN_DB over its last SETTLE_STEPS iterations) having gained less than FAITHFUL_GAIN of what its twin
    gained by the twin's pick, in dB: the twin then shows what the method does on an easier problem (kl-f8 texture
    at 64 px: 7.2 of 25.2 dB, ratio 0.28, its pick worse than E(x); 0.60-1.18 on the other 37 paper-protocol runs
    measured, docs/convergence.md "The rival"). A run still gaining, or shorter than SETTLE_STEPS, is not judged,
    unless its pick is its start and gains count from `origin` (2B,) PSNRs (a rival that goes on from the first run's
    pixel-best: from E(x) and E(x_t), the way its start came); without `origin` they count from the run's first
    iterate.

    >>> t = torch.tensor([[30.0, 30.0], [37.0, 55.0]] + [[37.0, 56.0]] * 30)  # 31 iterations, 1 real + its twin
    >>> S = lambda last: type("S", (), {"iterations": last})()
    >>> twin_faithful(t, [S(31), None], [1]), twin_faithful(t, [S(20), None], [1]), twin_faithful(t, [S(10), None], [1])
    ([False], [False], [True])
    >>> rising = torch.cat([t[:1], t[1:21] + torch.arange(20.0).view(-1, 1) * 0.2])  # +2.0 dB over its second half
    >>> twin_faithful(rising, [S(20), None], [1])
    [True]
    >>> twin_faithful(t[1:], [S(9), None], [0], torch.tensor([30.0, 30.0]))  # short, its pick its start: judged
    [False]
    """
    b = len(picks)
    base = trace_psnr[0] if origin is None else origin.to(trace_psnr)
    out = []
    for i, k in enumerate(picks):
        n = samples[i].iterations
        real_gain = (trace_psnr[k, i] - base[i]).item()
        twin_gain = (trace_psnr[k, b + i] - base[b + i]).item()
        best = trace_psnr[:n + 1, i].nan_to_num(-math.inf).cummax(0).values
        # a run shorter than 2 * SETTLE_STEPS settles over its second half: kl-f8 texture at 64 px, 20 steps, flat
        # (+0.12 dB) after iteration 10, its pick 7.1 of its twin's 25.2 dB and -10.0 dB from the truth (E(x) -15.6),
        # had stood unjudged against rivals that were stood for
        window = min(SETTLE_STEPS, n // 2)
        settled = n >= SETTLE_STEPS and (best[n] - best[n - window]).item() < SETTLED_GAIN_DB
        # a pick at the start of a run that goes on from an earlier run's iterate (`origin` given) is judged settled
        # or not: the gain to it is the earlier run's, whose path ended there (kl-f8 texture at 64 px, 30 steps: the
        # rival from the first run's pixel-best, still gaining, picked its start, 8.1 of its twin's 25.3 dB, and
        # replaced the early rival's pick: -10.0 dB from the truth against E(x)'s -15.6)
        judged = settled or (origin is not None and k == 0)
        out.append(not (judged and twin_gain > 0 and real_gain < FAITHFUL_GAIN * twin_gain))
    return out


def rival_wins(first_twin: dict, rival_twin: dict) -> bool:
    """Whether the rival run's pick replaces the first run's (core.solver's `rival`), from each run's twin record
    (`extra["twin"][i]`): a run whose twin was faithful (twin_faithful) beats one whose twin was not; otherwise the
    lower latent error of the twins at their picks, both twins' problems having the same known answer E(x). A rival
    that returned E(x) because its pick decoded worse never wins.

    >>> twin = lambda db, ok=True, why="twin": {"latent_nmse_db": db, "faithful": ok, "why": why}
    >>> rival_wins(twin(-41.5, ok=False), twin(-21.5))  # kl-f8 texture: the fixed point's twin did not stand for it
    True
    >>> (rival_wins(twin(-18.3), twin(-20.4)), rival_wins(twin(-50.7), twin(-23.3)),
    ...  rival_wins(twin(-18.3), twin(-30, why="decoded worse")))
    (True, False, False)
    """
    if rival_twin["why"] == "decoded worse":
        return False
    if first_twin["faithful"] != rival_twin["faithful"]:
        return rival_twin["faithful"]
    return rival_twin["latent_nmse_db"] < first_twin["latent_nmse_db"]


def twin_of(codec: Codec, image: Tensor, latent: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, z_t): the twin images D(E(x)) (rounded to 8 bits where x is) and their truth E(x)."""
    with torch.inference_mode():  # the decode as it is: E(x) must decode exactly to x_t before rounding
        x_t = codec.decode(latent.to(codec.dtype)).float()
        check_decoded_size(x_t, image)
        view = (image.shape[0],) + (1,) * (image.ndim - 1)
        x_t = torch.where(is_8bit(image).view(view), (x_t.clamp(0, 1) * 255).round() / 255, x_t)
    return x_t, latent


class TwinTracker:
    """During the run of a doubled batch (rows :B real, B: their twins): per real sample, the
    iterate at the twin's lowest latent error so far, while the real sample was still active."""

    def __init__(self, truth: Tensor, floor_psnr: Tensor, twin_floor_psnr: Tensor | None = None):
        self.batch = truth.shape[0]
        self.view = (self.batch,) + (1,) * (truth.ndim - 1)
        self.truth, self.floor_psnr = truth, floor_psnr
        self.truth_sq = truth.square().flatten(1).sum(1).clamp_min(1e-30)
        self.best_err = torch.full((self.batch,), math.inf, device=truth.device)
        self.z = truth.new_zeros(truth.shape)
        self.diff = torch.empty_like(truth)
        self.iteration = torch.zeros(self.batch, dtype=torch.long, device=truth.device)
        # every row's (real, then twin) first iterate within FLOOR_NEAR_DB of its floor (the twins': of their own 8-bit
        # image's; core.polish goes on from both); near_iteration -1: none yet
        self.row_floor_psnr = torch.cat([floor_psnr, floor_psnr if twin_floor_psnr is None else twin_floor_psnr])
        self.near_z = truth.new_zeros((2 * self.batch,) + tuple(truth.shape[1:]))
        self.near_iteration = torch.full((2 * self.batch,), -1, dtype=torch.long, device=truth.device)
        self.to_beat: Tensor | None = None  # (B,) dB, a rival's race (race(), outmatched())
        self.pace: Tensor | None = None  # (B,) dB per iteration, the early rival's (off_pace); None: rate alone
        self.start_err: Tensor | None = None  # (B,) the twins' latent error at the first iterate
        self.origin_psnr: Tensor | None = None  # (2B,) where gains count from (twin_faithful's origin); None: iterate 0
        self.settle = 0  # > 0 (core.polish's run): settled() after this many iterations without a new low

    def settled(self, k: int) -> Tensor | None:
        """(B,) True where the twin's latent error has not reached a new low for `settle` iterations: the pick will not
        change unless it turns down again. None unless settle is set."""
        return None if self.settle == 0 else (k - self.iteration) >= self.settle

    def race(self, to_beat_db: Tensor, first_faithful: Tensor, steps: int, pace_db: Tensor | None = None) -> None:
        """Make this a rival run's tracker (core.solver's rival): outmatched() then says which samples' rivals can no
        longer win against the pick standing (the first run's, or an earlier rival's), whose twins reached `to_beat_db`
        (B,) dB at their picks and stood for their runs where `first_faithful` (B,) bool (rival_wins); `steps` the
        rival's iterations; `pace_db` (B,) dB per iteration the twin may still gain at (off_pace), or None."""
        b, device = self.batch, self.truth.device
        self.to_beat, self.steps = to_beat_db.to(device, torch.float32), steps
        self.pace = None if pace_db is None else pace_db.to(device, torch.float32)
        self.first_faithful = first_faithful.to(device)
        self.history = torch.full((SETTLE_STEPS + 1, b), math.inf, device=device)  # the twins' best errors, dB
        self.lowest_mse = torch.full((b,), math.inf, device=device)  # the real rows' best pixel error so far ...
        self.lowest_history = torch.full((SETTLE_STEPS + 1, b), math.inf, device=device)  # ... and over the window
        self.rows = torch.arange(b, device=device)

    def outmatched(self, k: int, pixel_mse: Tensor) -> Tensor | None:
        """(B,) after observe(k), in a race: True where the rival can no longer win, by rival_wins' own terms: its
        twin's best error, falling from now to the last step at CATCH_UP times its rate over the last SETTLE_STEPS
        iterations, would stay more than TOO_CLOSE_DB above the first run's (and, given a pace, off_pace too), and
        either the first run's twin stood for it or the rival's, judged as twin_faithful would judge it if the run
        ended here, does not. `pixel_mse` (k + 1, 2B): every row's
        pixel error so far (the run's trace; NaN once stopped). None outside a race. On the device."""
        if self.to_beat is None:
            return None
        b, w = self.batch, SETTLE_STEPS
        real, twin = pixel_mse[:, :b], pixel_mse[:, b:]
        now = 10 * torch.log10(self.best_err.clamp_min(1e-30))
        self.history[k % (w + 1)] = now
        torch.fmin(self.lowest_mse, real[k], out=self.lowest_mse)  # fmin: a stopped row's NaN is no best
        self.lowest_history[k % (w + 1)] = self.lowest_mse
        if k < w:
            return torch.zeros_like(self.first_faithful)
        rate = (now - self.history[(k + 1) % (w + 1)]) / w  # <= 0: a best never rises
        behind = now + CATCH_UP * rate * (self.steps - k) > self.to_beat + TOO_CLOSE_DB  # NaN (no best yet): False
        if self.pace is not None:  # ... and off the early rival's pace as well
            behind &= off_pace(now, self.pace, self.steps - k, self.to_beat)
        picked = self.iteration.clamp_max(k)
        base = psnr_from_mse(pixel_mse[0]) if self.origin_psnr is None else self.origin_psnr
        real_gain = psnr_from_mse(real[picked, self.rows]) - base[:b]
        twin_gain = psnr_from_mse(twin[picked, self.rows]) - base[b:]
        # the best PSNR (the lowest error's) now against SETTLE_STEPS iterations ago
        window_start = self.lowest_history[(k + 1) % (w + 1)]
        settled = psnr_from_mse(self.lowest_mse) - psnr_from_mse(window_start) < SETTLED_GAIN_DB
        unfaithful = settled & (twin_gain > 0) & (real_gain < FAITHFUL_GAIN * twin_gain)
        return behind & (self.first_faithful | unfaithful)

    def observe(self, k: int, z: Tensor, active: Tensor, pixel_mse: Tensor) -> None:
        """Iterate k of the doubled batch, with each row's activity before this iteration's stop
        rules; a real iterate whose decode is not finite is never picked."""
        b = self.batch
        diff = torch.sub(z[b:], self.truth, out=self.diff).square_()  # in place: nothing latent-sized per step
        err = diff.flatten(1).sum(1) / self.truth_sq
        if k == 0:
            self.start_err = err.clone()
        better = (err < self.best_err) & active[:b] & torch.isfinite(pixel_mse[:b])
        torch.where(better, err, self.best_err, out=self.best_err)
        torch.where(better.view(self.view), z[:b], self.z, out=self.z)
        self.iteration.masked_fill_(better, k)
        near = (self.near_iteration < 0) & active & (psnr_from_mse(pixel_mse) >= self.row_floor_psnr - FLOOR_NEAR_DB)
        torch.where(near.view((2 * b,) + self.view[1:]), z, self.near_z, out=self.near_z)
        self.near_iteration.masked_fill_(near, k)

    def improved_within(self, k: int, window: int) -> Tensor:
        """(B,) True where the twin's latent error reached a new low in the last `window` iterations:
        auto-stop waits for those samples, so that stopping early keeps the full run's pick."""
        return (k - self.iteration) < window

    def twin_nmse_db(self) -> list[float]:
        return (10 * torch.log10(self.best_err.clamp_min(1e-30))).tolist()

    def twin_nmse_start_db(self) -> list[float]:
        """Per twin, the latent error (dB) of its first iterate (its start)."""
        return (10 * torch.log10(self.start_err.clamp_min(1e-30))).tolist()
