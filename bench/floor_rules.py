r"""Issue 12, item 2 at the noise floor: once a decode reaches the input's 8-bit noise floor the pixel error
cannot rank the iterates, and the pixel-best one is a near-random pick among them. Which visible rule
would pick a latent closer to the truth? Offline, on the anderson traces of `bench.twin_probe`: the
pixel-best iterate (the default there), the lowest fixed-point residual among the floor iterates, the
last iterate, and the discrepancy principle (the first iterate whose PSNR is within d dB of the floor),
each against the run's true minimum and the best plain method's pixel-best latent.

    .venv/bin/python -m bench.twin_probe 64 100 kl_f8_small \
        flat_noise,clipped,astronaut,chelsea,coffee,rocket anderson,km,forward /tmp/twin64.json
    .venv/bin/python -m bench.floor_rules /tmp/twin64.json 64
"""
from __future__ import annotations

import json
import sys

from .environment import boot
from .measure import load_vae, paper_pair, photo_bchw
from .table import markdown_table

MARGINS_DB = (0.02, 0.05, 0.1, 0.2, 0.5)


def rules(psnr: list, nmse: list, res: list, pixel_best: int, floor: float) -> dict:
    """Latent NMSE (dB) of the iterate each rule picks; None where no iterate reaches the floor."""
    at = [k for k, p in enumerate(psnr) if p >= floor - 1]  # the default's floor test (1 dB margin)
    out = {"pixel-best": nmse[pixel_best], "last": nmse[-1], "true min": min(nmse)}
    out["min residual at floor"] = nmse[min(at, key=lambda k: res[k])] if at else None
    for d in MARGINS_DB:
        first = next((k for k, p in enumerate(psnr) if p >= floor - d), None)
        out[f"first within {d} dB"] = None if first is None else nmse[first]
    return out


def main(argv=None) -> int:
    path, size = (argv or sys.argv[1:])[:2]
    probe = json.load(open(path))
    ctx = boot(2)
    from core.twin import noise_floor_psnr

    best_plain, codecs, header, cells = {}, {}, None, []
    for key, v in probe.items():
        model, image, _ = key.split("/")
        real = v["real"]
        best_plain[model, image] = min(best_plain.get((model, image), 0.0), real["nmse"][real["best"]])
    for key, v in probe.items():
        model, image, method = key.split("/")
        if method != "anderson":
            continue
        if model not in codecs:
            codecs[model] = ctx.adapter.vae_codec(load_vae(model), "fp32", (1, 3, int(size), int(size)))
        x, _ = paper_pair(codecs[model], photo_bchw(image, int(size)))
        floor = noise_floor_psnr(x).item()
        real = v["real"]
        picked = rules(real["psnr"], real["nmse"], real["res"], real["best"], floor)
        if picked["min residual at floor"] is None:
            continue  # below the floor the twin decides, not these rules
        header = ["VAE", "image", "best plain method", *picked]
        cells.append([model, image, f"{best_plain[model, image]:.2f}",
                      *("-" if v is None else f"{v:.2f}" for v in picked.values())])
    print("\n".join(markdown_table(header, cells)) if header else "no cell reached the noise floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
