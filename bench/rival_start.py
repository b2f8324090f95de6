"""Where the default's rival starts (issue 12, session 15): core.solver's `rival_early_steps` side by side.

The rival (`diis`, core.rival.with_rival) runs each image the twin decided for again, with its own twin. From E(x)
it starts where the fixed point started; from the pixel-best of E(x) and the first K fixed-point iterates it starts
a few dB closer in pixels, before the fixed point's drift sets in (the hybrid restarts that way:
core.hybrid.EARLY_STEPS).
Per VAE x size x image, in the paper protocol (z_gt = E(photo), x = D(z_gt) in 8 bits), the default for each K in
`--early`, one process: latent NMSE against z_gt, PSNR, whether the rival's pick was returned, its twin's latent
error at its pick, seconds.

    .venv/bin/python -m bench.rival_start --sizes 64 --early 0 1 2 3 --out bench/results

Writes <out>/<date>-<device>-rival-start.md and .json.
"""
from __future__ import annotations

import argparse

from .cases import CASES, PHOTO_CASES
from .environment import add_run_args, boot, run_meta, save_result
from .measure import image_rows, paper_pair, photo_bchw
from .rival import PHOTOS


def rows_for(core, codec, model: str, image: str, size: int, early: list[int]) -> list[dict]:
    x, z_gt = paper_pair(codec, photo_bchw(image, size))
    out = []
    for k in early:
        r = core.invert(codec, x, rival_early_steps=k)
        rival, s = r.extra.get("rival") or {}, r.samples[0]
        out.append(dict(model=model, size=size, image=image, early=k,
                        nmse_db=round(core.nmse_db(r.latent, z_gt)[0].item(), 2),
                        psnr=round(s.psnr_best, 2), why=r.extra["twin"][0]["why"],
                        rival_ran=0 in rival.get("samples", []),
                        rival_chosen=0 in rival.get("chosen", []),
                        twin_rival_db=(rival.get("twin_nmse_db") or [None])[0], seconds=round(r.seconds, 2)))
    return out


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Where the default's rival starts — {m['date']}, {m['device']}, {m['threads']} threads", "",
             f"`{m['command']}`: the paper protocol, fp32, core's default with `rival_early_steps` = K (0: from E(x)), "
             "one process, side by side. NMSE: the returned latent against z_gt (dB, lower is better); rival: whether "
             "its pick was returned (— where it did not run: the decode reached the noise floor or the race stopped it "
             "unrun); twin dB: the rival's twin's latent NMSE at its pick.", "",
             "| VAE | size | image | K | NMSE dB | PSNR dB | rival | rival twin dB | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rival = ("yes" if r["rival_chosen"] else "no") if r["rival_ran"] else "—"
        lines.append(f"| {r['model']} | {r['size']} | {r['image']} | {r['early']} | {r['nmse_db']} | {r['psnr']} | "
                     f"{rival} | {r['twin_rival_db']} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, sizes=[64])
    p.add_argument("--images", nargs="+", default=[*CASES, *PHOTO_CASES, *PHOTOS])
    p.add_argument("--early", type=int, nargs="+", default=[0, 1])
    a = p.parse_args(argv)
    ctx = boot(a.threads)
    nested = image_rows(ctx, a.models, a.sizes, a.images,
                        lambda codec, model, image, size: rows_for(ctx.core, codec, model, image, size, a.early))
    rows = [r for group in nested for r in group]
    print(save_result(a.out, "rival-start", run_meta("bench.rival_start", argv, a.threads), rows, markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
