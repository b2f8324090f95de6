"""Issue 12, offline: a rule tried and rejected (docs/convergence.md) -- reject the twin's pick (return
E(x)) where the twin did not behave like the image. It fixed the one paper-protocol failure (kl-f8
texture 64 px) but on real photos the twin, in the decoder's range by construction, is always the
easier problem: TAEF2 at 128 px returned E(x) on all four shared photos. Kept to reproduce the table.
Reads a `bench.twin_probe` JSON (real and twin traces per VAE x image x method, each run alone) and
prints, per pair: the encoder's latent NMSE, what auto would return with the rule (pixel-best at the
noise floor, else the twin's pick, else E(x)), and the rule's ratio (the real run's pixel gain up to the
twin's pick over its twin's; below FAITHFUL_GAIN the pick is rejected once the real run's pixel error
has settled).

    .venv/bin/python -m bench.twin_probe 64 100 kl_f8_small,taef2 astronaut,stars anderson /tmp/twin64.json
    .venv/bin/python -m bench.twin_faithful 64 /tmp/twin64.json
"""
from __future__ import annotations

import json
import sys

from .environment import boot
from .measure import load_vae, paper_pair, photo_bchw


SETTLE = 20  # the rule applied once the pixel error had this many iterations without a new best
FAITHFUL_GAIN = 0.5


def faithful(real_gain_db: float, twin_gain_db: float) -> bool:
    """The rejected rule: the real run gained at least FAITHFUL_GAIN of its twin's gain (dB) by the pick."""
    return not twin_gain_db > 0 or real_gain_db >= FAITHFUL_GAIN * twin_gain_db


def floors(ctx, size: int, keys: list[str]) -> dict:
    """{model/image: the noise-floor PSNR of its paper-protocol image}, as the solver computes it."""
    import importlib

    twin = importlib.import_module(ctx.core.__name__ + ".twin")
    out, codecs = {}, {}
    for key in keys:
        model, image = key.split("/")[:2]
        if model not in codecs:
            codecs[model] = ctx.adapter.vae_codec(load_vae(model), "fp32", (1, 3, size, size))
        x, _ = paper_pair(codecs[model], photo_bchw(image, size))
        out[f"{model}/{image}"] = twin.noise_floor_psnr(x).item()
    return out


def main(argv=None) -> int:
    size, path = (argv or sys.argv[1:])[:2]
    ctx = boot(2)
    from importlib import import_module

    twin = import_module(ctx.core.__name__ + ".twin")
    probe = json.loads(open(path).read())
    floor = floors(ctx, int(size), list(probe))
    print("| pair | encoder NMSE | auto's pick | NMSE returned | real / twin pixel gain to the pick (dB) | ratio |")
    print("|---|---|---|---|---|---|")
    for key, v in probe.items():
        real, sim = v["real"], v["sim"]
        k = sim["nmse"].index(min(sim["nmse"]))
        fl = floor["/".join(key.split("/")[:2])]
        g_real, g_twin = real["psnr"][k] - real["psnr"][0], sim["psnr"][k] - sim["psnr"][0]
        if max(real["psnr"]) >= fl - twin.FLOOR_MARGIN_DB:
            pick, nmse = "pixel (floor)", real["nmse"][real["psnr"].index(max(real["psnr"]))]
        elif real["psnr"][k] < real["psnr"][0] or (
                len(real["psnr"]) - 1 - real["psnr"].index(max(real["psnr"])) >= SETTLE
                and not faithful(g_real, g_twin)):
            pick, nmse = "E(x)", real["nmse"][0]
        else:
            pick, nmse = f"twin @{k}", real["nmse"][k]
        ratio = g_real / g_twin if g_twin > 0 else float("nan")
        print(f"| {key} | {real['nmse'][0]:.2f} | {pick} | {nmse:.2f} | {g_real:.1f} / {g_twin:.1f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
