"""Issue 12 probe (docs/convergence.md): does the twin problem (core.twin) predict where the real run's
latent error is lowest? Per VAE x image x method, the latent NMSE, PSNR and residual of every iterate
of the real paper-protocol run and of its twin, each run alone (select="pixel"), to a JSON.

    .venv/bin/python -m bench.twin_probe 32 100 taef2,kl_f8_small flat_objects,stars anderson,forward /tmp/twin.json
"""
import importlib, json, math, sys, time
from dataclasses import replace
import torch
torch.set_num_threads(2)
from tests.support import host
H = host.boot()
pack = H.pack.__name__
adapter = importlib.import_module(pack + ".nodes.adapter")
core = importlib.import_module(pack + ".core")
from bench import measure

size, steps = int(sys.argv[1]), int(sys.argv[2])
models = sys.argv[3].split(",")
names = sys.argv[4].split(",")
methods = sys.argv[5].split(",")
out_path = sys.argv[6]

def q8(t):
    return (t.float().clamp(0, 1) * 255).round() / 255

def nmse(z, zg):
    return 10 * math.log10(max(((z - zg) ** 2).sum().item(), 1e-30) / (zg ** 2).sum().item())

def curve(codec, x, zg, method):
    zs = []
    def tr(z):
        zs.append(z.detach().clone()); return codec.decode(z)
    c = replace(codec, decode=tr)
    t = time.perf_counter()
    r = core.invert(c, x, core.InversionOptions(method=method, steps=steps, stall_steps=0, select="pixel"))
    return dict(nmse=[nmse(z, zg) for z in zs], psnr=r.trace_psnr[:, 0].tolist(),
                res=r.trace_residual_db[:, 0].tolist(), move=[nmse(z, zs[0]) for z in zs],
                best=r.samples[0].best_iteration, sec=time.perf_counter() - t)

res = {}
for m in models:
    vae = measure.load_vae(m)
    codec = adapter.vae_codec(vae, "fp32", (1, 3, size, size))
    for n in names:
        with torch.inference_mode():
            zg = codec.encode(measure.photo_bchw(n, size)).float()
            x = q8(codec.decode(zg))
            zs = codec.encode(x).float()
            xs = q8(codec.decode(zs))
        x, zg, zs, xs = (t.clone() for t in (x, zg, zs, xs))
        for meth in methods:
            real = curve(codec, x, zg, meth)
            sim = curve(codec, xs, zs, meth)
            res[f"{m}/{n}/{meth}"] = dict(real=real, sim=sim)
            print(m, n, meth, "enc %.2f" % real["nmse"][0], "realbest@%d %.2f" % (real["best"], real["nmse"][real["best"]]),
                  "minreal %.2f@%d" % (min(real["nmse"]), real["nmse"].index(min(real["nmse"]))),
                  "minsim @%d" % sim["nmse"].index(min(sim["nmse"])),
                  "real@simargmin %.2f" % real["nmse"][sim["nmse"].index(min(sim["nmse"]))],
                  "%.1fs" % (real["sec"] + sim["sec"]), flush=True)
        json.dump(res, open(out_path, "w"))
