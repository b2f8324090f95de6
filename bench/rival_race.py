"""The default's rival with and without its race (issue 12; docs/convergence.md, "The rival's race").

The race stops the `diis` rival once it can no longer win (core.twin.TwinTracker.outmatched). It must not change a
result, only the time: per VAE and image, the default as it is and with the race off (core.twin.CATCH_UP = inf: the
rival's twin could catch up at any rate), side by side in one process, on the paper protocol's pairs (z_gt known:
latent NMSE reported) or on the photos as a node gets them. The run exits non-zero where the two latents differ.

    .venv/bin/python -m bench.rival_race --protocol paper --sizes 64 --out bench/results
    .venv/bin/python -m bench.rival_race --protocol photo --sizes 64 --images astronaut chelsea coffee rocket

Writes <out>/<date>-<device>-rival-race-<protocol>-<sizes>px.md and .json.
"""
from __future__ import annotations

import argparse

import torch

from .environment import add_run_args, boot, run_meta, save_result
from .measure import image_rows, paper_pair, photo_bchw, race_off
from .twin_probe import nmse

IMAGES = ("flat_objects", "flat_noise", "stars", "texture", "clipped", "astronaut", "chelsea", "coffee", "rocket")


def row(core, codec, model: str, image: str, size: int, paper: bool) -> dict:
    x, z_gt = paper_pair(codec, photo_bchw(image, size)) if paper else (photo_bchw(image, size), None)
    x = x.clone()
    raced = core.invert(codec, x)
    with race_off(core):
        whole = core.invert(codec, x)
    rival = raced.extra.get("rival") or {}
    stopped = {i: k for i, k in rival.get("outmatched", [])}
    return dict(model=model, image=image, size=size, same_latent=torch.equal(raced.latent, whole.latent),
                rival_ran=0 in rival.get("samples", []), rival_chosen=0 in rival.get("chosen", []),
                stopped_at=stopped.get(0), twin_first_db=raced.extra["twin"][0]["latent_nmse_db"],
                latent_nmse_db=None if z_gt is None else round(nmse(raced.latent, z_gt.clone()), 2),
                psnr=round(raced.samples[0].psnr_best, 2),
                seconds_raced=round(raced.seconds, 2), seconds_whole=round(whole.seconds, 2))


def markdown(result: dict) -> str:
    m, rows = result["meta"], result["rows"]
    lines = [f"# The default's rival with and without its race — {m['date']}, {m['device']}, "
             f"{m['threads']} threads", "",
             f"`{m['command']}`: fp32, the default (`core.invert`, auto-stop on) as it is and with the race off "
             "(`core.twin.CATCH_UP` = inf), one process, side by side. \"Stopped at\": the rival's iteration where the "
             "race ended it (\"—\": it ran on, or did not run: the decode reached the noise floor).", "",
             "| VAE | size | image | rival ran / chosen | stopped at | same latent | latent NMSE (dB) | PSNR (dB) "
             "| s raced / whole |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ran = ("yes / " + ("yes" if r["rival_chosen"] else "no")) if r["rival_ran"] else "no"
        lines.append(f"| {r['model']} | {r['size']} | {r['image']} | {ran} | {r['stopped_at'] or '—'} | "
                     f"{'yes' if r['same_latent'] else '**no**'} | {r['latent_nmse_db'] or '—'} | {r['psnr']} | "
                     f"{r['seconds_raced']} / {r['seconds_whole']} |")
    raced, whole = sum(r["seconds_raced"] for r in rows), sum(r["seconds_whole"] for r in rows)
    lines += ["", f"Same latent on {sum(r['same_latent'] for r in rows)} of {len(rows)}; the race stopped the rival on "
              f"{sum(r['stopped_at'] is not None for r in rows)} of the {sum(r['rival_ran'] for r in rows)} "
              f"where it ran; "
              f"seconds in all: {raced:.1f} raced, {whole:.1f} whole ({raced / whole:.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=("paper", "photo"), default="paper")
    add_run_args(p, sizes=[64])
    p.add_argument("--images", nargs="+", default=list(IMAGES))
    a = p.parse_args(argv)
    ctx = boot(a.threads)
    rows = image_rows(ctx, a.models, a.sizes, a.images,
                      lambda codec, model, image, size: row(ctx.core, codec, model, image, size, a.protocol == "paper"))
    name = f"rival-race-{a.protocol}-{'-'.join(map(str, a.sizes))}px"
    print(save_result(a.out, name, run_meta("bench.rival_race", argv, a.threads), rows, markdown))
    return 0 if all(r["same_latent"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
