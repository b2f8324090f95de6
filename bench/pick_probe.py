"""Which iterate should the default return where the twin decides? (issue 12; docs/convergence.md, "Never past
the pixel-best").

The default's fixed-point run on the paper protocol's pairs, every step, no rival (`rival=""`), each real iterate
kept: per VAE, size and image, the twin's pick and the pixel-best iterate, their latent NMSE against the true latent,
and the decoder's gain ||D(b) - D(a)|| / ||b - a|| along the moves E(x) -> pick, pick -> pixel-best (and the twin's
own move over the same iterations), relative to random directions of the same length (3, seeded): a drift along
directions the decoder barely responds to has a low gain.

    .venv/bin/python -m bench.pick_probe --sizes 64 --out bench/results

Writes <out>/<date>-<device>-pick-probe-<sizes>px.md and .json.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace

import torch

from .environment import add_run_args, boot, run_meta, save_result
from .measure import image_rows, paper_pair, photo_bchw
from .twin_probe import nmse

IMAGES = ("flat_objects", "flat_noise", "stars", "texture", "clipped", "astronaut", "chelsea", "coffee", "rocket")
RANDOM_DIRECTIONS = 3


def relative_gain(codec, base: torch.Tensor, move: torch.Tensor, generator) -> float:
    """The decoder's gain along `move` at `base`, over its mean gain along random directions of the same length."""
    if move.norm() == 0:
        return math.nan
    with torch.inference_mode():
        at = codec.decode(base).float()

        def gain(d):
            return ((codec.decode(base + d).float() - at).norm() / d.norm()).item()
        randoms = [torch.randn(move.shape, generator=generator) for _ in range(RANDOM_DIRECTIONS)]
        return gain(move) / (sum(gain(v / v.norm() * move.norm()) for v in randoms) / RANDOM_DIRECTIONS)


def row(core, codec, model: str, image: str, size: int, steps: int) -> dict:
    x, z_gt = paper_pair(codec, photo_bchw(image, size))
    x, z_gt = x.clone(), z_gt.clone()
    iterates = []  # the doubled batch's decodes (real row, twin row); the twin image's own decode has batch 1

    def keep(z, decode=codec.decode):
        if z.shape[0] == 2:
            iterates.append(z.detach().clone())
        return decode(z)

    r = core.invert(replace(codec, decode=keep), x, steps=steps, stall_steps=0, rival="")
    twin = r.extra["twin"][0]
    k_twin, k_pixel = twin["iteration"], int(r.trace_psnr[:, 0].nan_to_num(-math.inf).argmax())
    real, mirror = [z[:1] for z in iterates], [z[1:] for z in iterates]
    g = torch.Generator().manual_seed(0)

    def db(z):
        return round(nmse(z, z_gt), 2)

    def gain(a, b):
        return round(relative_gain(codec, a, b - a, g), 3)
    return dict(model=model, image=image, size=size, why=twin["why"], twin_pick=k_twin, pixel_best=k_pixel,
                nmse_encoder_db=db(real[0]), nmse_twin_pick_db=db(real[k_twin]), nmse_pixel_best_db=db(real[k_pixel]),
                nmse_returned_db=db(r.latent),
                gain_encoder_to_pick=gain(real[0], real[k_twin]),
                gain_pick_to_pixel_best=gain(real[k_twin], real[k_pixel]),
                twin_gain_pick_to_pixel_best=gain(mirror[k_twin], mirror[k_pixel]))


def markdown(result: dict) -> str:
    m, rows = result["meta"], result["rows"]
    lines = [f"# The twin's pick and the pixel-best iterate — {m['date']}, {m['device']}, {m['threads']} threads", "",
             f"`{m['command']}`: fp32, the paper protocol, the default's fixed-point run with every step and no rival. "
             "Why: the rule that decided (\"twin\", \"pixel best first\": the twin's pick came after the pixel-best; "
             "\"floor\", \"noise level\": the decode reached the noise floor, the twin does not decide). Gains: the "
             "decoder's along the move, over random directions' of its length (1.0 = a random direction).", "",
             "| VAE | size | image | why | twin's pick / pixel-best | latent NMSE (dB): E(x) / pick / pixel-best / "
             "returned | gain E(x)→pick | gain pick→pixel-best (twin's own) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} | {r['image']} | {r['why']} | "
                     f"{r['twin_pick']} / {r['pixel_best']} | "
                     f"{r['nmse_encoder_db']} / {r['nmse_twin_pick_db']} / {r['nmse_pixel_best_db']} / "
                     f"{r['nmse_returned_db']} | {r['gain_encoder_to_pick']} | {r['gain_pick_to_pixel_best']} "
                     f"({r['twin_gain_pick_to_pixel_best']}) |")
    decided = [r for r in rows if r["why"] in ("twin", "decoded worse", "pixel best first")]
    first = [r for r in decided if r["why"] == "pixel best first"]
    lines += ["", f"The twin decided {len(decided)} of {len(rows)}; its pick came after the pixel-best on {len(first)}"
              + (": " + ", ".join(f"{r['model']} {r['image']} {r['size']} px" for r in first) if first else "") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, sizes=[64])
    p.add_argument("--images", nargs="+", default=list(IMAGES))
    p.add_argument("--steps", type=int, default=100)
    a = p.parse_args(argv)
    ctx = boot(a.threads)
    rows = image_rows(ctx, a.models, a.sizes, a.images,
                      lambda codec, model, image, size: row(ctx.core, codec, model, image, size, a.steps))
    name = f"pick-probe-{'-'.join(map(str, a.sizes))}px"
    print(save_result(a.out, name, run_meta("bench.pick_probe", argv, a.threads), rows, markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
