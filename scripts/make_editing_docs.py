"""Pictures for the README's editing section, on the real TAEF2 weights (CPU, in-process ComfyUI):

  docs/drift_plot.png          VAE Round-Trip Drift's PSNR-per-generation plot (5 generations)
  docs/drift_side_by_side.png  original | stock VAE Encode | VAE Exact Encode after 5 generations
  docs/inpaint_outside_mask.png  original with the mask | stock encode decoded | exact (for Inpaint)
                               decoded, each with |error| outside the grown mask

Prints the measured numbers. Run: .venv/bin/python scripts/make_editing_docs.py [--steps 20]
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

DOCS = REPO / "docs"


def save(t: torch.Tensor, name: str, scale: int = 1) -> None:
    img = Image.fromarray((t.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(DOCS / name, optimize=True)
    print("wrote", DOCS / name)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20, help="exact-encode steps per generation / inpaint encode")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--photo", default="astronaut")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from tests.support import host as host_mod
    from tests.support import models
    from tests.support.images import photos

    host = host_mod.boot()
    nodes = importlib.import_module(host.pack.__name__ + ".nodes")
    core = importlib.import_module(host.pack.__name__ + ".core")
    n = host.nodes
    with torch.inference_mode():
        vae = models.taef2_vae()
    image = photos(args.size)[args.photo]
    DOCS.mkdir(exist_ok=True)
    with torch.inference_mode():
        stock, exact, side, plot, report = nodes.VAERoundTripDrift.execute(image, vae, 5, args.steps, "adam").result
    print(report)
    save(plot[0], "drift_plot.png")
    save(side[0], "drift_side_by_side.png")

    s = args.size
    mask = torch.zeros(1, s, s)
    mask[:, s // 4: s * 3 // 4, s // 4: s * 3 // 4] = 1.0
    with torch.inference_mode():
        latent, summary = nodes.VAEExactEncodeForInpaint.execute(image, vae, mask, 6, args.steps, "adam").result
        plain = n.VAEDecode().decode(vae, n.VAEEncode().encode(vae, image)[0])[0]
        exact_dec = n.VAEDecode().decode(vae, latent)[0]
    print(summary)
    keep = (1.0 - latent["noise_mask"])[0, 0, :, :, None]
    panels, vmax = [image[0] * (1 - 0.5 * mask[0, :, :, None])], 0.25
    for name, dec in (("stock VAE Encode", plain), ("VAE Exact Encode (for Inpaint)", exact_dec)):
        err = core.region_error(dec.movedim(-1, 1), image.movedim(-1, 1), keep[None, None, :, :, 0])[0]
        print(f"outside the grown mask, {name}: PSNR {err['psnr']:.2f} dB, max abs {err['max_abs']:.4f}")
        e = ((dec[0] - image[0]).abs().mean(-1, keepdim=True) * keep / vmax).clamp(0, 1)
        panels.append(dec[0])
        panels.append(e.expand(-1, -1, 3))
    save(torch.cat(panels, dim=1), "inpaint_outside_mask.png")


if __name__ == "__main__":
    main()
