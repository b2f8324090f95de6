"""At the noise floor, the fixed point goes on (InversionOptions.floor_steps; docs/convergence.md, "Past the noise
level").

Where a sample's decode reached the input's 8-bit noise floor, the default returns the first iterate at that noise
level (core.pick, the discrepancy principle): past it the pixels cannot rank the latents. But the damped forward step
(km) does not stop there: from that iterate it moves along directions the round trip E(D(.)) barely sees, and the
latent first comes closer to the truth, then drifts off (kl-f8 at 64 px: rocket -41.44 -> -42.83 dB at 100 km steps,
-40.44 at 400; clipped only drifts off). How far to go is what the twin (core.twin) is for: the same km steps from the
twin's own first iterate at its noise level, against its known answer, pick the iterate returned.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .codec import Codec
from .rerun import left_of, merged, rerun
from .result import InversionResult

if TYPE_CHECKING:
    from .solver import InversionOptions

Tensor = torch.Tensor

POLISHED = "past noise level"  # extra["twin"][i]["why"] and SampleStats.selection of a sample it moved
POLISH_METHOD = "km"  # damped and inertial: at the floor it moves a little per step, where anderson's mixing jumps


def at_noise_level(result: InversionResult) -> list[int]:
    """The samples returned at their first iterate at the noise level whose twin also got to its own."""
    twins = result.extra.get("twin") or []
    return [i for i, t in enumerate(twins)
            if t["why"] == "noise level" and t.get("twin_noise_level_iteration", -1) >= 0]


def polish_at_floor(first: InversionResult, codec: Codec, image: Tensor, opts: InversionOptions, callback,
                    weight) -> InversionResult:
    """The samples at_noise_level run on by opts.floor_steps km steps from that iterate (their twins from theirs),
    each returning its twin's pick where that is a later iterate that decodes no worse (merged: the sample's trace
    column goes on with these iterations)."""
    rows, left = at_noise_level(first), left_of(opts, first.seconds)
    if opts.floor_steps == 0 or not rows or left <= 0 or first.noise_level_rows is None:
        return first
    b, at = len(first.samples), torch.tensor(rows, device=first.noise_level_rows.device)
    start = torch.cat([first.noise_level_rows[at], first.noise_level_rows[at + b]])
    polish_opts = replace(opts, method=POLISH_METHOD, lr=None, steps=opts.floor_steps, select="twin", rival="",
                          unstable_steps=0, record_every=0)
    # settle: stop once the twin's error has not fallen for stall_steps iterations (it falls, then rises: its pick is
    # behind it), as auto-stop would with the pixels, which at the floor still inch up
    second = rerun(first, codec, image, rows, polish_opts, left, callback, weight, start=start,
                   settle=opts.stall_steps)
    use = [j for j, t in enumerate(second.extra["twin"]) if t["why"] == "twin" and t["iteration"] > 0]
    result = merged(first, second, rows, use, {"why": POLISHED})
    for i in (rows[j] for j in use):  # and the first run's floor, not the polish run's (select twin: none)
        result.samples[i] = replace(result.samples[i], selection=POLISHED)
        result.extra["twin"][i]["floor_psnr"] = first.extra["twin"][i]["floor_psnr"]
    result.extra["polish"] = {"method": POLISH_METHOD, "samples": rows, "moved": [rows[j] for j in use]}
    return result
