"""Issue 12 mechanism probe (docs/convergence.md): latent NMSE along the iterations and the decoder's gain
along the motion of each method, relative to random latent directions, in the paper protocol.

    .venv/bin/python -m bench.drift_probe      # TAEF2 and kl_f8_small, flat_objects and stars, 32 px, 30 steps
"""
import importlib
import json
import math
import time

import torch

from bench.environment import DEFAULT_THREADS
from tests.support import host

torch.set_num_threads(DEFAULT_THREADS)
H = host.boot()
pack = H.pack.__name__
adapter = importlib.import_module(pack + ".nodes.adapter")
core = importlib.import_module(pack + ".core")
from bench import measure as _measure, cases  # noqa: E402
from dataclasses import replace  # noqa: E402


def codec_for(model, size):
    vae = _measure.load_vae(model)
    return adapter.vae_codec(vae, "fp32", (1, 3, size, size))


def image(name, size):
    if name in cases.CASES:
        return cases.make(name, size)
    if name in cases.PHOTO_CASES:
        src, f = cases.PHOTO_CASES[name]
        return f(_measure.photo_bchw(src, size))
    return _measure.photo_bchw(name, size)


def pair(codec, name, size):
    with torch.inference_mode():
        z_gt = codec.encode(image(name, size)).float()
        x = (codec.decode(z_gt).float().clamp(0, 1) * 255).round() / 255
    return x.clone(), z_gt.clone()


def nmse(z, zg):
    return 10 * math.log10(max(((z - zg) ** 2).sum().item(), 1e-30) / (zg ** 2).sum().item())


def traced_run(codec, x, z_gt, **opts):
    zs = []
    if opts.get("method") == "gradient":
        dg = codec.differentiable_decode()

        def tr(z):
            zs.append(z.detach().clone())
            return dg(z)
        c = replace(codec, grad_decode=lambda: tr)
    else:
        def tr(z):
            zs.append(z.detach().clone())
            return codec.decode(z)
        c = replace(codec, decode=tr)
    t = time.perf_counter()
    r = core.invert(c, x, core.InversionOptions(**opts))
    sec = time.perf_counter() - t
    return r, zs, sec


torch.manual_seed(0)
size = 32
res = {}
for m in ("taef2", "kl_f8_small"):
    codec = codec_for(m, size)
    dg = codec.differentiable_decode()
    for n in ("flat_objects", "stars"):
        x, zg = pair(codec, n, size)
        with torch.inference_mode():
            e0 = codec.encode(x).float()
            xg = codec.decode(zg)

        def gain(d, base=zg, eps=None):
            with torch.inference_mode():
                if eps is not None:
                    d = d / d.norm() * eps
                return ((codec.decode(base + d) - codec.decode(base)).norm() / d.norm()).item()
        rnd = sum(gain(torch.randn_like(zg), eps=0.1 * zg.norm().item()) for _ in range(3)) / 3
        out = {}
        for meth, o in (("anderson", dict(method="anderson")), ("forward", dict(method="forward")),
                        ("gradient", dict(method="gradient", lr=0.03, schedule=False, track_residual=False))):
            r, zs, _ = traced_run(codec, x, zg, steps=30, stall_steps=0, **o)
            dd = zs[-1] - zs[1]  # the motion after the first step
            out[meth] = dict(nmse_first=nmse(zs[1], zg), nmse_last=nmse(zs[-1], zg),
                             motion_gain=gain(dd, base=zs[1]) / rnd)
        # first-step directions at z0 = E(x), each at the same small length
        with torch.inference_mode():
            s_fp = -(codec.encode(codec.decode(e0)) - e0)
        zq = e0.clone().requires_grad_(True)
        with torch.enable_grad():
            s_gr = -torch.autograd.grad(((dg(zq) - x) ** 2).sum(), zq)[0]
        eps = 0.05 * e0.norm().item()
        out["first_step_gain"] = dict(fixed_point=gain(s_fp, base=e0, eps=eps) / rnd,
                                      gradient=gain(s_gr, base=e0, eps=eps) / rnd)
        res[f"{m}/{n}"] = out
        print(m, n, json.dumps(out), flush=True)
print(json.dumps(res, indent=1))
