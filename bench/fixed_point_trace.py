"""Issue 12 probe: where does a fixed-point run go when its latent gets worse than E(x)?

Runs Anderson (or, with memory 0, the forward step) at step 0.5 from E(x) in the paper protocol and prints, at
selected iterations, the decode's PSNR against x, the latent residual ||E(D(z)) - E(x)|| / ||E(x)||, the latent
NMSE against the truth and the distance moved from E(x) (all in dB). On kl-f8 texture at 64 px the residual keeps
falling while the PSNR falls and the latent moves by its own size: the iteration converges to a *different* fixed
point, a latent whose round trip matches E(x) but whose decode does not match x (docs/convergence.md, "The rival").

    .venv/bin/python -m bench.fixed_point_trace kl_f8_small texture 64 5 100
"""
from __future__ import annotations

import sys

import torch

from .environment import boot
from .measure import load_vae, paper_pair, photo_bchw


def db(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(a.square().sum() / b.square().sum())).item()


def main(argv=None) -> int:
    model, image, size, memory, steps = (argv or sys.argv[1:])[:5]
    size, memory, steps = int(size), int(memory), int(steps)
    ctx = boot(2)
    from importlib import import_module

    steppers = import_module(ctx.core.__name__ + ".steppers")
    codec = ctx.adapter.vae_codec(load_vae(model), "fp32", (1, 3, size, size))
    x, z_gt = paper_pair(codec, photo_bchw(image, size))
    with torch.inference_mode():
        e = codec.encode(x).float()
        z = e.clone().contiguous()
        stepper = steppers.Anderson(z, 0.5, memory) if memory > 0 else steppers.Forward(0.5)
        active = torch.ones(1, 1, 1, 1)
        print("| iteration | PSNR | residual | latent NMSE | distance from E(x) |\n|---|---|---|---|---|")
        for k in range(steps + 1):
            decoded = codec.decode(z).float()
            g = codec.encode(decoded).float() - e
            psnr = -10 * torch.log10((decoded.clamp(0, 1) - x).square().mean()).item()
            if k < 6 or k % max(1, steps // 25) == 0:
                moved = db(z - e, e) if k else float("-inf")
                print(f"| {k} | {psnr:.2f} | {db(g, e):.2f} | {db(z - z_gt, z_gt):.2f} | {moved:.2f} |", flush=True)
            stepper.step(z, g, active)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
