"""Issue 12 probe (docs/convergence.md): does the twin problem (core.twin) predict where the real run's
latent error is lowest? Per VAE x image x method, the latent NMSE, PSNR and residual of every iterate
of the real paper-protocol run and of its twin, each run alone (select="pixel"), to a JSON
(`bench.twin_faithful` reads it).

    .venv/bin/python -m bench.twin_probe 32 100 taef2,kl_f8_small flat_objects,stars anderson,forward /tmp/twin.json
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace

import torch

from .environment import boot
from .measure import load_vae, paper_pair, photo_bchw


def nmse(z: torch.Tensor, ref: torch.Tensor) -> float:
    return 10 * math.log10(max(((z - ref) ** 2).sum().item(), 1e-30) / (ref ** 2).sum().item())


def curve(core, codec, x, z_true, method: str, steps: int) -> dict:
    """Every iterate of one run (the decoder's inputs, recorded), against its true latent."""
    zs = []

    def recording_decode(z):
        zs.append(z.detach().clone())
        return codec.decode(z)

    t = time.perf_counter()
    r = core.invert(replace(codec, decode=recording_decode), x,
                    core.InversionOptions(method=method, steps=steps, stall_steps=0, select="pixel"))
    return dict(nmse=[nmse(z, z_true) for z in zs], psnr=r.trace_psnr[:, 0].tolist(),
                res=r.trace_residual_db[:, 0].tolist(), move=[nmse(z, zs[0]) for z in zs],
                best=r.samples[0].best_iteration, sec=time.perf_counter() - t)


def main(argv=None) -> int:
    size, steps, models, names, methods, out_path = (argv or sys.argv[1:])[:6]
    size, steps = int(size), int(steps)
    ctx = boot(2)
    res = {}
    for m in models.split(","):
        codec = ctx.adapter.vae_codec(load_vae(m), "fp32", (1, 3, size, size))
        for n in names.split(","):
            # the real pair (x, z_gt), and its twin: the same protocol on x itself (D(E(x)) in 8 bits, E(x))
            x, z_gt = paper_pair(codec, photo_bchw(n, size))
            x_twin, z_twin = paper_pair(codec, x)
            x, z_gt, x_twin, z_twin = (t.clone() for t in (x, z_gt, x_twin, z_twin))
            for meth in methods.split(","):
                real = curve(ctx.core, codec, x, z_gt, meth, steps)
                twin = curve(ctx.core, codec, x_twin, z_twin, meth, steps)
                res[f"{m}/{n}/{meth}"] = dict(real=real, sim=twin)
                k = twin["nmse"].index(min(twin["nmse"]))
                print(m, n, meth, "enc %.2f" % real["nmse"][0],
                      "realbest@%d %.2f" % (real["best"], real["nmse"][real["best"]]),
                      "minreal %.2f@%d" % (min(real["nmse"]), real["nmse"].index(min(real["nmse"]))),
                      "minsim @%d" % k, "real@simargmin %.2f" % real["nmse"][k],
                      "%.1fs" % (real["sec"] + twin["sec"]), flush=True)
            with open(out_path, "w") as f:
                json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
