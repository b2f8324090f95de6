"""The default's gradient rival on real photos (issue 12): what a node user gets, with no true latent to score.

In the paper protocol (bench.run, `ours` against `ours-free`) the rival is scored by the latent NMSE. A real
photo is not in the decoder's range, so only what the run itself sees can be reported: per VAE and photo, the
default without the rival (`rival=""`, gradient-free), with the rival from its early start only
(`rival_from_pixel_best=False`, the default before session 17) and the default, side by side in one process: the PSNR
of the returned latent's decode, whether the rival ran and was chosen (and the second one, from the first run's
pixel-best), the two twins' latent errors at their picks (what `core.twin.rival_wins` compares), and the seconds.

    .venv/bin/python -m bench.rival --sizes 64 128 --out bench/results

Writes <out>/<date>-<device>-rival-photos.md and .json.
"""
from __future__ import annotations

import argparse

from .environment import add_run_args, boot, run_meta, save_result
from .measure import image_rows, photo_bchw

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def row(core, codec, model: str, photo: str, size: int) -> dict:
    x = photo_bchw(photo, size)
    free = core.invert(codec, x, rival="")
    one = core.invert(codec, x, rival_from_pixel_best=False)
    default = core.invert(codec, x)
    rival = default.extra.get("rival") or {}
    again = rival.get("from_pixel_best") or {}
    twin = default.extra["twin"][0]
    return dict(model=model, photo=photo, size=size,
                psnr_encoder=round(free.samples[0].psnr_initial, 2), psnr_free=round(free.samples[0].psnr_best, 2),
                psnr_one_rival=round(one.samples[0].psnr_best, 2), psnr_default=round(default.samples[0].psnr_best, 2),
                again_ran=0 in again.get("samples", []), again_chosen=0 in again.get("chosen", []),
                again_unjudged=0 in again.get("unjudged", []), again_off_pace=0 in again.get("off_pace", []),
                free_why=free.extra["twin"][0]["why"], rival_ran=0 in rival.get("samples", []),
                rival_chosen=0 in rival.get("chosen", []), skipped=rival.get("skipped"),
                twin_free_db=free.extra["twin"][0]["latent_nmse_db"],
                twin_rival_db=(rival.get("twin_nmse_db") or [None])[0], default_why=twin["why"],
                seconds_free=round(free.seconds, 2), seconds_one_rival=round(one.seconds, 2),
                seconds_default=round(default.seconds, 2))


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# The default's gradient rival on real photos — {m['date']}, {m['device']}, {m['threads']} threads", "",
             f"`{m['command']}`: the shared photos as a node gets them (not the paper protocol: no true latent), fp32, "
             "core's default with `rival=\"\"` (gradient-free), with the rival from its early start only "
             "(`rival_from_pixel_best=False`) and the default, one process, side by side. Twin dB: each run's "
             "twin latent NMSE at its pick (what `core.twin.rival_wins` compares); again: the rival from the first "
             "run's pixel-best.",
             "", "| VAE | size | photo | PSNR E(x) | PSNR without rival | PSNR one rival | PSNR default | "
             "rival chosen | again chosen | twin dB without / rival | s without / one rival / default |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        chosen = "skipped: " + r["skipped"] if r["skipped"] else ("yes" if r["rival_chosen"] else
                                                                  "no" if r["rival_ran"] else
                                                                  f"not run ({r['free_why']})")
        again = (("yes" if r["again_chosen"] else "no") if r["again_ran"] else
                 "not run: pick not stood for" if r.get("again_unjudged") else
                 "not run: off pace" if r.get("again_off_pace") else "not run")
        lines.append(f"| {r['model']} | {r['size']} | {r['photo']} | {r['psnr_encoder']} | {r['psnr_free']} | "
                     f"{r['psnr_one_rival']} | {r['psnr_default']} | {chosen} | {again} | {r['twin_free_db']} / "
                     f"{r['twin_rival_db']} | {r['seconds_free']} / {r['seconds_one_rival']} / "
                     f"{r['seconds_default']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, sizes=[64, 128])
    p.add_argument("--photos", nargs="+", default=list(PHOTOS))
    a = p.parse_args(argv)
    ctx = boot(a.threads)
    rows = image_rows(ctx, a.models, a.sizes, a.photos,
                      lambda codec, model, photo, size: row(ctx.core, codec, model, photo, size))
    print(save_result(a.out, "rival-photos", run_meta("bench.rival", argv, a.threads), rows, markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
