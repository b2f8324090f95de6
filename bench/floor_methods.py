"""At the noise floor, how far apart the fixed-point methods' latents are (issue 12, item 2; session 19).

Item 2 asks the default to come within 0.5 dB of the best of {paper's adam, forward, km, anderson} in latent NMSE,
each returning its pixel-best iterate. Where the decode reaches the input's 8-bit noise floor (kl-f8 on most cells),
the pixels cannot rank the latents any more, so the best of four may be a lucky pick. Per VAE x size x case, in the
paper protocol (z_gt = E(case), x = D(z_gt) in 8 bits), one process: each method's pixel-best iterate (the plain rows
of bench.run), each method with the default's selection and no rival (`rival=""`: the twin's pick below the floor,
the first iterate at the noise level at it), the mean of the three fixed-point methods' such latents, and the default;
also anderson's pixel-best run with the mirrored image beside it in the batch (the same computation per sample, but
batched convolutions round differently). Latent NMSE in dB against z_gt.

    .venv/bin/python -m bench.floor_methods --models kl_f8_small --sizes 64 --out bench/results

Writes <out>/<date>-<device>-floor-methods.md and .json.
"""
from __future__ import annotations

import argparse

import torch

from .environment import add_run_args, boot, run_meta, save_result
from .measure import FREE_CONFIGS, image_rows, paper_pair, photo_bchw

CASES = ("flat_objects", "flat_noise", "stars", "texture", "clipped", "astronaut", "chelsea", "coffee", "rocket")
PLAIN = ("paper", "forward", "km", "anderson")
# the same runs with the default's selection (select "auto"): the plain rows' configs less their select="pixel"
SELECTED = {m: {k: v for k, v in FREE_CONFIGS[m].items() if k != "select"} for m in PLAIN}


def row(core, codec, model: str, case: str, size: int) -> dict:
    x, z_gt = paper_pair(codec, photo_bchw(case, size))

    def nmse_db(z, ref):
        return round(core.nmse_db(z[:1], ref)[0].item(), 2)
    with torch.inference_mode():
        z_enc = codec.encode(x).float()
    out = dict(model=model, case=case, size=size, encoder=nmse_db(z_enc, z_gt))
    for m in PLAIN:
        out["plain_" + m] = nmse_db(core.invert(codec, x, **FREE_CONFIGS[m]).latent, z_gt)
    # the same run with the mirrored image beside it in the batch: per sample it is the same computation, but batched
    # convolutions round differently, which at the floor is all that tells the latents apart
    beside = core.invert(codec, torch.cat([x, x.flip(-1)]), **FREE_CONFIGS["anderson"])
    out["plain_anderson_batched"] = nmse_db(beside.latent, z_gt)
    latents = {}
    for m, options in SELECTED.items():
        r = core.invert(codec, x, rival="", **options)
        latents[m] = r.latent
        out["selected_" + m], out["why_" + m] = nmse_db(r.latent, z_gt), r.extra["twin"][0]["why"]
    out["mean_fixed_point"] = nmse_db(sum(latents[m] for m in ("forward", "km", "anderson")) / 3, z_gt)
    default = core.invert(codec, x)
    out["default"], out["why_default"] = nmse_db(default.latent, z_gt), default.extra["twin"][0]["why"]
    out["best_plain"] = max(PLAIN, key=lambda m: -out["plain_" + m])
    return out


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# The fixed-point methods' latents at the noise floor — {m['date']}, {m['device']}, "
             f"{m['threads']} threads", "",
             f"`{m['command']}`: paper protocol, fp32, 100 steps, one process. Latent NMSE (dB) against z_gt. "
             "plain: each method's pixel-best iterate (bench.run's rows; item 2 compares with the lowest of four); "
             "selected: the method with the default's selection and no rival (why: the rule that picked); mean: of the "
             "three fixed-point methods' selected latents; anderson batched: its plain row run with the mirrored image "
             "beside it in the batch (only the rounding differs).", "",
             "| VAE | size | case | encoder | plain paper / forward / km / anderson | selected paper / forward / km / "
             "anderson (why: anderson's) | mean | default (why) | default - best plain | "
             "anderson plain alone / batched |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        best = r["plain_" + r["best_plain"]]
        plain = " / ".join(str(r["plain_" + k]) for k in PLAIN)
        selected = " / ".join(str(r["selected_" + k]) for k in PLAIN)
        lines.append(f"| {r['model']} | {r['size']} | {r['case']} | {r['encoder']} | {plain} | {selected} "
                     f"({r['why_anderson']}) | {r['mean_fixed_point']} | {r['default']} ({r['why_default']}) | "
                     f"{round(r['default'] - best, 2)} | {r['plain_anderson']} / {r['plain_anderson_batched']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, sizes=[64])
    p.add_argument("--cases", nargs="+", default=list(CASES))
    a = p.parse_args(argv)
    ctx = boot(a.threads)
    rows = image_rows(ctx, a.models, a.sizes, a.cases,
                      lambda codec, model, case, size: row(ctx.core, codec, model, case, size))
    print(save_result(a.out, "floor-methods", run_meta("bench.floor_methods", argv, a.threads), rows, markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
