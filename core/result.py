"""What the solvers return. Every result type (`InversionResult` here, `core.temporal.ChunkedResult`,
`core.diffusion_inversion.DiffusionInversionResult`) follows one protocol, `Result`: the output
tensor as `latent`, `summary()` for people and `to_dict()` for JSON (its "kind" says which type).

    >>> import torch
    >>> from core.result import Result
    >>> from core.temporal import ChunkedResult
    >>> from core.diffusion_inversion import DiffusionInversionResult
    >>> results = [ChunkedResult(latent=torch.zeros(1), chunks=[], seconds=0.0, method="adam"),
    ...            DiffusionInversionResult(x=torch.zeros(1), mode="naive")]
    >>> [(isinstance(r, Result), r.to_dict()["kind"]) for r in results]
    [(True, 'chunked'), (True, 'diffusion_inversion')]
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class Result(Protocol):
    """What node code may rely on, whichever solver ran."""

    latent: torch.Tensor

    def summary(self) -> str: ...

    def to_dict(self) -> dict: ...


@dataclass
class SampleStats:
    """One image's outcome. PSNR is of D(z) against the target image x, in dB; the residual is
    ||E(D(z)) - E(x)|| / ||E(x)|| in dB (NaN where it was not computed)."""

    psnr_initial: float  # D(E(x)): what the plain encoder gives
    psnr_final: float  # the last iterate evaluated
    psnr_best: float  # the returned latent
    residual_db_initial: float
    residual_db_final: float
    residual_db_best: float
    best_iteration: int
    iterations: int  # updates applied before this sample stopped
    stop_reason: str  # max_steps | diverged | ... | twin_settled: core.run_state.STOP_REASONS (see stop_text)
    # With options.record_every: the paper's assumption along the trajectory
    # (core.diagnostics.cocoercivity: beta_min, beta_median, share_positive, points).
    cocoercivity: Optional[dict] = None
    # What picked the returned iterate (core.twin): "pixel" its pixel error (with selection auto also where the twin
    # picked a later iterate, extra["twin"][i]["why"] "pixel best first"), "twin" the twin problem's
    # lowest latent error, "encoder" E(x) because the twin's pick decoded worse than it, "noise level"
    # the first iterate whose decode came within core.twin.FLOOR_NEAR_DB of the noise floor (the input's 8-bit one, or
    # the lower 16-bit codec's own, core.twin.precision_floor_psnr), "past noise level" the twin's pick of the damped
    # forward steps that went on from there (core.polish).
    selection: str = "pixel"

    @property
    def gain_db(self) -> float:
        return self.psnr_best - self.psnr_initial


def stop_text(reason: str, options: dict) -> str:
    """Why a sample stopped, in words, from its stop reason and the run's options.

    >>> stop_text("stalled", {"stall_steps": 20, "stall_flat_db": 1.0})
    'stalled (no new best in 20 iterations, residual within 1.0 dB)'
    """
    o = {k: ("?" if v is None else v) for k, v in options.items()}
    words = {
        "max_steps": "all {steps} steps",
        "diverged": "diverged (residual above {divergence}x its start, or not finite)",
        "tolerance": "tolerance (residual <= {tolerance})",
        "patience": "patience (no new best in {patience} iterations)",
        "stalled": "stalled (no new best in {stall_steps} iterations, residual within {stall_flat_db} dB)",
        "time_budget": "time_budget ({time_budget} s spent)",
        "outmatched": "outmatched (a rival whose twin could no longer get closer than the first run's)",
        "twin_settled": "twin settled (its latent error had not fallen for {stall_steps} iterations)",
    }
    try:
        return words[reason].format(**o)
    except KeyError:  # an unknown reason, or options without the key
        return reason


SELECTION_TEXT = {  # how the summary names the returned iterate, by SampleStats.selection
    "pixel": "best at iteration",
    "twin": "returned the twin problem's pick (its latent error was lowest) at iteration",
    "encoder": "returned E(x): the twin's pick decoded worse, iteration",
    "noise level": "returned the first iterate at the noise level (8-bit rounding, or a 16-bit codec's own), iteration",
    "past noise level": "went on from the first iterate at the noise level by damped forward steps to the twin "
                        "problem's pick, iteration",
}


def _recomputed(who: str, estimate_mb) -> str:
    """The notes' line on a backward that recomputed the decoder's blocks (InversionOptions.checkpoint)."""
    about = f" (about {estimate_mb:.0f} MiB of activations)" if estimate_mb is not None else ""
    return f"{who}: the decoder's blocks recomputed in the backward{about}, to fit the memory cap or as asked"


def _outmatched(method: str, stopped: list | None) -> list[str]:
    """The summary's line on rival runs the race stopped ([[image, iteration], ...])."""
    if not stopped:
        return []
    where = ", ".join(f"{i + 1} (its iteration {k})" for i, k in stopped)
    return [f"{method} rival stopped early for image(s): {where}: its twin could no longer get closer to its answer "
            "than the standing pick's twin, so it could not win"]


@dataclass
class InversionResult:
    latent: torch.Tensor  # (B, C, h, w) fp32, the best iterate per sample
    samples: list[SampleStats]
    trace_psnr: torch.Tensor  # (iterations + 1, B) on the CPU, NaN after a sample stopped (where a rerun's pick is
    # returned, core.solver's rival or unstable_steps: the sample's column goes on with the rerun's iterations)
    trace_residual_db: torch.Tensor  # same shape
    seconds: float  # wall time of the whole batch
    method: str
    dtype: str
    options: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # what the method reports about its path (core.hybrid)
    # a twin batch's pixel-best iterate of every row (real samples, then their twins) before the twin's pick; None
    # without a twin. The default's second rival starts there (core.rival.with_rival). Not in to_dict.
    pixel_best_rows: Optional[torch.Tensor] = field(default=None, repr=False)
    # ... and every row's first iterate at its noise level (extra["twin"][i]["twin_noise_level_iteration"] -1: the twin
    # got to none), where core.polish goes on from. Not in to_dict.
    noise_level_rows: Optional[torch.Tensor] = field(default=None, repr=False)

    def summary(self) -> str:
        """One line per image, for people."""
        lines = []
        for i, s in enumerate(self.samples):
            res = "" if math.isnan(s.residual_db_best) else (
                f", residual {s.residual_db_initial:.1f} -> {s.residual_db_best:.1f} dB")
            lines.append(
                f"image {i + 1}: PSNR {s.psnr_initial:.2f} -> {s.psnr_best:.2f} dB "
                f"({s.gain_db:+.2f} dB){res}; {SELECTION_TEXT[s.selection]} {s.best_iteration}/{s.iterations}, "
                f"stop: {stop_text(s.stop_reason, self.options)}")
        lines.append(f"{self.method}, {self.dtype}, {self.seconds:.2f} s for {len(self.samples)} image(s)")
        lines += self.notes()
        return "\n".join(lines)

    def notes(self) -> list[str]:
        """Lines on what the run did beyond its method's steps: the default's rival, the hybrid's memory cap."""
        lines = []
        rival = self.extra.get("rival")
        if rival and rival["skipped"]:
            lines.append(f"{rival['method']} rival not run: {rival['skipped']}")
        elif rival:
            again = rival.get("from_pixel_best") or {}
            # "chosen" holds every sample that returns a rival's pick; the early rival's is returned where the second
            # run from the pixel-best did not replace it
            chosen = ", ".join(str(i + 1) for i in rival["chosen"] if i not in again.get("chosen", [])) or "none"
            k = rival.get("early_steps", 0)
            steps = "the first fixed-point step" if k == 1 else f"the first {k} fixed-point steps"
            start = "E(x)" if k == 0 else f"the pixel-best of E(x) and {steps}"
            lines.append(f"{rival['method']} rival run from {start} on {len(rival['samples'])} image(s) whose decode "
                         f"stayed below the noise floor; its pick returned for image(s): {chosen}")
            lines += _outmatched(rival["method"], rival.get("outmatched"))
            if rival.get("recomputed_blocks"):  # core.hybrid.backward_plan
                lines.append(_recomputed(f"{rival['method']} rival", rival["activation_estimate_mb"]))
            if again.get("samples"):
                chosen = ", ".join(str(i + 1) for i in again["chosen"]) or "none"
                lines.append(f"{rival['method']} rival run again from the first run's pixel-best iterate on image(s) "
                             f"{', '.join(str(i + 1) for i in again['samples'])}; "
                             f"its pick returned for image(s): {chosen}")
                lines += _outmatched(rival["method"], again.get("outmatched"))
            if again.get("unjudged"):  # core.rival.with_rival: where the standing pick's twin did not stand for it
                unjudged = ", ".join(str(i + 1) for i in again["unjudged"])
                lines.append(f"{rival['method']} rival not run again from the first run's pixel-best iterate on "
                             f"image(s) {unjudged}: the returned pick's twin did not stand for it (x is not explained "
                             f"as its twin is; on the real photos measured that run never won)")
            if again.get("off_pace"):  # core.twin.off_pace: even at the first rival's pace it could not have won
                skipped = ", ".join(str(i + 1) for i in again["off_pace"])
                lines.append(f"{rival['method']} rival not run again from the first run's pixel-best iterate on "
                             f"image(s) {skipped}: at the first rival's pace its twin could not have got closer than "
                             f"the returned pick's")
        later = [str(i + 1) for i, t in enumerate(self.extra.get("twin") or []) if t["why"] == "pixel best first"]
        if later:  # core.pick.select_picks: auto never returns an iterate after the pixel-best
            lines.append(f"pixel-best iterate returned where the twin picked a later one (the decode only got worse "
                         f"after it), for image(s): {', '.join(later)}")
        if self.extra.get("gradient_allowed") is False:  # the hybrid kept to its memory cap
            lines.append(f"gradient steps skipped: their activations (about {self.extra['activation_estimate_mb']:.0f} "
                         f"MiB) exceed memory_limit_mb {self.extra['memory_limit_mb']:.0f}")
        elif self.extra.get("recomputed_blocks") and any(
                k is not None for k in self.extra.get("switch_iteration", [0])):  # a gradient method has no switch
            lines.append(_recomputed("gradient steps", self.extra["activation_estimate_mb"]))
        return lines

    def rival_outcome(self, i: int) -> str:
        """Sample i and the default's rival: "chosen" (its pick was returned), "not chosen", "not run: <why>" or
        "" where it was not needed (the fixed point reached the noise floor, or no rival was asked for)."""
        rival = self.extra.get("rival")
        if not rival or i not in rival["candidates"]:
            return ""
        if rival["skipped"]:
            return f"not run: {rival['skipped']}"
        if i not in rival["samples"]:
            return "not run: time budget"
        return "chosen" if i in rival["chosen"] else "not chosen"

    def to_dict(self) -> dict:
        """JSON-ready: stats, options and the trace as lists (NaN becomes None)."""
        def clean(t):
            return [[None if math.isnan(v) else round(v, 4) for v in row] for row in t.T.tolist()]
        return {
            "kind": "inversion", "method": self.method, "dtype": self.dtype, "seconds": self.seconds,
            "options": self.options, "extra": self.extra,
            "samples": [dict(asdict(s), gain_db=s.gain_db) for s in self.samples],
            "trace": {"psnr": clean(self.trace_psnr), "residual_db": clean(self.trace_residual_db)},
        }
