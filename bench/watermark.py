"""Tree-Ring detection and key classification on the trained tiny model (issue 15; the paper's Table 2).

    .venv/bin/python -m bench.watermark            # the committed table (about an hour on 2 CPU cores)
    .venv/bin/python -m bench.watermark --quick    # smoke run: 4 images per set, 2 keys, few steps

Generations go through ComfyUI's own nodes, as in workflows/treering_embed.json: Tree-Ring Watermarked
Noise (or stock Random Noise) -> SamplerCustomAdvanced (CFGGuider cfg 1, the model's fixed empty
conditioning, euler, normal schedule) -> VAE Decode -> 8-bit PNG. Three sets: `ring` (one ring key),
`rand` (K rand keys, equal shares) and `clean` (no key). Each PNG is attacked (none, JPEG 90,
resize 0.75x and back, Gaussian noise sigma 2/255, re-quantised to 8 bits), encoded by every
encoder (stock VAE Encode; the pack's solver through the node's own codec: default, the paper's
adam, the gradient baseline, hybrid) and inverted to its initial noise by Diffusion Inversion (the
node; naive = DDIM inversion, exact = fixed-point refined steps), then read by core.detect:

- detection: AUC and TPR at 1 % FPR (threshold from the clean set's scores) of ring images vs clean
  images with the ring key, and of rand images vs clean images with each image's key (clean image
  i is tested against key i mod K); also the rate of `p < 0.01`, Tree-Ring Detect's own verdict;
- key classification: on the rand set, the key with the smallest L1 and the one with the smallest
  p-value among the K keys, vs the generating key;
- cost: seconds per image of encoding and of inversion (this machine, whole batches);
- accuracy: NMSE (dB) of the encoder's latent vs the sampler's output, and of the recovered
  noise vs the true initial noise.

Writes bench/results/<date>-<device>-watermark.json and .md (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import io
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .environment import DEFAULT_THREADS, REPO, boot, device_info, git_state

ATTACKS = ("none", "jpeg90", "resize0.75", "noise2")
ENCODERS = ("stock", "default", "adam", "gradient", "hybrid")
ORACLE = "oracle"  # the sampler's own latent: no VAE round trip, the ceiling of every encoder (attack none)
ENCODER_LABELS = {
    ORACLE: "sampler's own latent (no VAE: upper bound)",
    "stock": "VAE Encode (stock)", "default": "VAE Exact Encode default (anderson, auto-stop)",
    "adam": "paper's adam", "gradient": "gradient baseline (Adam 0.03 x RMS, constant)",
    "hybrid": "hybrid",
}
ENCODER_OPTIONS = {"default": {}, "adam": {"method": "adam"},
                   "gradient": {"method": "gradient", "lr": 0.03, "schedule": False, "track_residual": False},
                   "hybrid": {"method": "hybrid"}}
INVERSIONS = ("naive", "exact")


@dataclass(frozen=True)
class Setup:
    n: int = 100           # images per set (ring, clean); rand gets n rounded up to a multiple of keys
    keys: int = 8          # K rand keys
    size: int = 64         # px (8 x 8 latents through kl_f8_small)
    radius: int = 2        # Tree-Ring's 10 bins at a 64 x 64 latent, scaled to 8 x 8 (1.25), rounded up
    channel: int = -1      # every latent channel carries the key
    sampler_steps: int = 10
    encode_steps: int = 20
    iterations: int = 10   # exact inversion: fixed-point refinements per step at most
    tolerance: float = 1e-4
    batch: int = 64        # images per solver call
    seed: int = 0


QUICK = Setup(n=4, keys=2, sampler_steps=3, encode_steps=2, iterations=2)


class Pack:
    """The host's nodes and the pack's modules."""

    def __init__(self, env):
        name = env.host.pack.__name__
        self.core = env.core
        self.adapter = env.adapter
        self.nodes = env.host.nodes
        self.treering = importlib.import_module(name + ".nodes.treering")
        self.inversion = importlib.import_module(name + ".nodes.diffusion_inversion")


# ---- generation ---------------------------------------------------------------------------------
def generate(pack, model, vae, cond, setup: Setup, noise_obj, batch: int):
    """One SamplerCustomAdvanced batch: (true initial noise, sampler output latent, 8-bit images)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    cells = setup.size // 8
    latent = {"samples": torch.zeros(batch, 4, cells, cells)}
    with torch.inference_mode():
        noise = noise_obj.generate_noise(latent).float()
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(*cond)
        guider.set_cfg(1.0)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal",
                                                 setup.sampler_steps)
        out, _ = SamplerCustomAdvanced.execute(noise_obj, guider, comfy.samplers.ksampler("euler"), sigmas,
                                               latent).result
        images = pack.nodes.VAEDecode().decode(vae, out)[0]
    return noise, out["samples"].float(), images


def png_round_trip(images: torch.Tensor, folder: Path, prefix: str) -> torch.Tensor:
    """Write each image as an 8-bit PNG and read it back (B, H, W, 3) in [0, 1]."""
    out = []
    for i, img in enumerate(images):
        path = folder / f"{prefix}_{i:04d}.png"
        Image.fromarray((img.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
        out.append(torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255.0))
    return torch.stack(out)


def make_sets(pack, model, vae, cond, setup: Setup, folder: Path):
    """{set: {"noise", "latent", "images", "key_index"}} and the keys: ring and K rand keys."""
    cells = setup.size // 8
    shape = (4, cells, cells)
    core = pack.core
    ring = core.TreeRingKey(shape, "ring", setup.radius, setup.channel, seed=setup.seed + 1000)
    rand = [core.TreeRingKey(shape, "rand", setup.radius, setup.channel, seed=setup.seed + 2000 + k)
            for k in range(setup.keys)]
    per_key = math.ceil(setup.n / setup.keys)
    wm = pack.treering._WatermarkedNoise
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    parts = {"ring": [(wm(setup.seed + 1, ring), setup.n, -1)],
             "rand": [(wm(setup.seed + 10 + k, key), per_key, k) for k, key in enumerate(rand)],
             "clean": [(Noise_RandomNoise(setup.seed + 2), setup.n, -1)]}
    sets = {}
    for name, jobs in parts.items():
        noise, latent, images, index = [], [], [], []
        for noise_obj, count, k in jobs:
            n_, z_, x_ = generate(pack, model, vae, cond, setup, noise_obj, count)
            noise.append(n_)
            latent.append(z_)
            images.append(x_)
            index += [k] * count
        images = png_round_trip(torch.cat(images), folder, name)
        sets[name] = {"noise": torch.cat(noise), "latent": torch.cat(latent), "images": images,
                      "key_index": torch.tensor(index)}
    return sets, ring, rand


# ---- attacks ------------------------------------------------------------------------------------
def attack(images: torch.Tensor, name: str, seed: int) -> torch.Tensor:
    """(B, H, W, 3) 8-bit images in [0, 1] -> attacked 8-bit images, same size."""
    if name == "none":
        return images
    if name == "noise2":
        g = torch.Generator().manual_seed(seed)
        noisy = images + torch.randn(images.shape, generator=g) * (2 / 255)
        return (noisy.clamp(0, 1) * 255).round() / 255
    out = []
    for img in images:
        pil = Image.fromarray((img.numpy() * 255).round().astype(np.uint8))
        if name == "jpeg90":
            buf = io.BytesIO()
            pil.save(buf, "JPEG", quality=90)
            pil = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        elif name == "resize0.75":
            w, h = pil.size
            pil = pil.resize((round(w * 0.75), round(h * 0.75)), Image.BICUBIC).resize((w, h), Image.BICUBIC)
        else:
            raise ValueError(f"attack: unknown {name!r}; one of {', '.join(ATTACKS)}")
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0))
    return torch.stack(out)


# ---- encoders and inversion ---------------------------------------------------------------------
def encode(pack, vae, images: torch.Tensor, encoder: str, setup: Setup) -> torch.Tensor:
    """Latents (B, 4, h, w) in the VAE's units."""
    if encoder == "stock":
        with torch.inference_mode():
            return pack.nodes.VAEEncode().encode(vae, images)[0]["samples"].float()
    codec = pack.adapter.vae_codec(vae, "fp32")
    pixels = images.permute(0, 3, 1, 2).contiguous()
    chunks = []
    for i in range(0, pixels.shape[0], setup.batch):
        r = pack.core.invert(codec, pixels[i:i + setup.batch], steps=setup.encode_steps,
                             **ENCODER_OPTIONS[encoder])
        chunks.append(r.latent.float())
    return torch.cat(chunks)


def invert(pack, model, cond, latent: torch.Tensor, mode: str, setup: Setup) -> torch.Tensor:
    node = pack.inversion.DiffusionInversion
    with torch.inference_mode():
        out, _ = node.execute(model, cond[0], cond[1], 1.0, setup.sampler_steps, "normal", {"samples": latent},
                              mode, setup.iterations, setup.tolerance).result
    return out["samples"].float()


# ---- scores -------------------------------------------------------------------------------------
def nmse_db(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of 10 log10(||a - ref||^2 / ||ref||^2)."""
    err = (a - ref).flatten(1).pow(2).sum(1) / ref.flatten(1).pow(2).sum(1)
    return float((10 * torch.log10(err.clamp_min(1e-30))).mean())


def score(d) -> tuple:
    """Larger = more watermarked: -log p, ties (p underflows to 0) broken by the statistic S."""
    return (-math.log10(max(d.p_value, 1e-300)), -d.statistic)


def auc(pos: list[tuple], neg: list[tuple]) -> float:
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def tpr_at(pos: list[tuple], neg: list[tuple], fpr: float = 0.01) -> float:
    """TPR at the threshold that lets at most floor(fpr * n) clean images through."""
    allowed = int(math.floor(fpr * len(neg) + 1e-9))
    threshold = sorted(neg, reverse=True)[allowed]  # the best clean score not allowed through
    return sum(p > threshold for p in pos) / len(pos)


def detection(pack, noise: dict, ring, rand) -> dict:
    detect = pack.core.detect
    k = len(rand)
    clean, ring_set, rand_set = noise["clean"], noise["ring"], noise["rand"]
    ring_pos = detect(ring_set["noise"], ring)
    ring_neg = detect(clean["noise"], ring)
    per_key = [detect(rand_set["noise"], key) for key in rand]  # [key][image]
    truth = rand_set["key_index"].tolist()
    rand_pos = [per_key[truth[i]][i] for i in range(len(truth))]
    rand_neg = [detect(clean["noise"][i:i + 1], rand[i % k])[0] for i in range(clean["noise"].shape[0])]
    by_l1 = [min(range(k), key=lambda j: per_key[j][i].l1) for i in range(len(truth))]
    by_p = [min(range(k), key=lambda j: (per_key[j][i].p_value, per_key[j][i].statistic)) for i in range(len(truth))]
    return {
        "ring_auc": auc([score(d) for d in ring_pos], [score(d) for d in ring_neg]),
        "ring_tpr_at_1pct_fpr": tpr_at([score(d) for d in ring_pos], [score(d) for d in ring_neg]),
        "ring_p_below_001": float(np.mean([d.watermarked for d in ring_pos])),
        "rand_auc": auc([score(d) for d in rand_pos], [score(d) for d in rand_neg]),
        "rand_tpr_at_1pct_fpr": tpr_at([score(d) for d in rand_pos], [score(d) for d in rand_neg]),
        "rand_p_below_001": float(np.mean([d.watermarked for d in rand_pos])),
        "clean_p_below_001": float(np.mean([d.watermarked for d in ring_neg + rand_neg])),
        "key_accuracy_l1": float(np.mean([a == b for a, b in zip(by_l1, truth)])),
        "key_accuracy_p": float(np.mean([a == b for a, b in zip(by_p, truth)])),
    }


def run_cell(pack, model, vae, cond, sets, attacked, encoder, setup, ring, rand) -> list[dict]:
    """One (attack, encoder): encode every set once, invert it both ways."""
    latents, t0 = {}, time.perf_counter()
    for name, images in attacked.items():
        latents[name] = sets[name]["latent"] if encoder == ORACLE else encode(pack, vae, images, encoder, setup)
    n_images = sum(x.shape[0] for x in attacked.values())
    encode_s = (time.perf_counter() - t0) / n_images
    latent_nmse = nmse_db(torch.cat([latents[s] for s in sets]), torch.cat([sets[s]["latent"] for s in sets]))
    rows = []
    for mode in INVERSIONS:
        t0 = time.perf_counter()
        noise = {name: {"noise": invert(pack, model, cond, z, mode, setup), "key_index": sets[name]["key_index"]}
                 for name, z in latents.items()}
        invert_s = (time.perf_counter() - t0) / n_images
        noise_nmse = nmse_db(torch.cat([noise[s]["noise"] for s in sets]), torch.cat([sets[s]["noise"] for s in sets]))
        rows.append({"encoder": encoder, "inversion": mode, **detection(pack, noise, ring, rand),
                     "latent_nmse_db": latent_nmse, "noise_nmse_db": noise_nmse,
                     "encode_s_per_image": encode_s, "invert_s_per_image": invert_s})
    return rows


# ---- report -------------------------------------------------------------------------------------
COLUMNS = (("ring_auc", "ring AUC", 3), ("ring_tpr_at_1pct_fpr", "ring TPR@1%", 2),
           ("rand_auc", "rand AUC", 3), ("rand_tpr_at_1pct_fpr", "rand TPR@1%", 2),
           ("key_accuracy_l1", "key acc (L1)", 2), ("key_accuracy_p", "key acc (p)", 2),
           ("clean_p_below_001", "clean p<0.01", 2), ("latent_nmse_db", "latent NMSE dB", 1),
           ("noise_nmse_db", "noise NMSE dB", 1), ("encode_s_per_image", "encode s/img", 3),
           ("invert_s_per_image", "invert s/img", 3))


def markdown(result: dict) -> str:
    meta, s = result["meta"], result["setup"]
    lines = [f"# Tree-Ring on the trained tiny model ({meta['date']}, {meta['device']})", "",
             f"`{meta['command']}` (commit {meta['git']['commit']}, {meta['seconds']:.0f} s).", "",
             f"Sets: ring {s['n']}, rand {result['counts']['rand']} ({s['keys']} keys), clean {s['n']}; "
             f"{s['size']} px, key radius {s['radius']}, channel {s['channel']}; euler {s['sampler_steps']} steps, "
             f"normal schedule, cfg 1; encoders {s['encode_steps']} steps; exact inversion <= {s['iterations']} "
             f"refinements per step (tolerance {s['tolerance']:g}). Key accuracy: chance = {1 / s['keys']:.3f}.", ""]
    for attack_name in result["attacks"]:
        lines += [f"## attack: {attack_name}", "",
                  "| encoder | inversion | " + " | ".join(c[1] for c in COLUMNS) + " |",
                  "|---|---|" + "---|" * len(COLUMNS)]
        for row in result["rows"]:
            if row["attack"] == attack_name:
                cells = [f"{row[k]:.{d}f}" for k, _, d in COLUMNS]
                lines.append(f"| {ENCODER_LABELS[row['encoder']]} | {row['inversion']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.watermark", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (4 images per set, 2 keys, few steps)")
    p.add_argument("--n", type=int, help="images per set")
    p.add_argument("--keys", type=int, help="K, the number of rand keys")
    p.add_argument("--radius", type=int, help="key radius (frequency bins)")
    p.add_argument("--sampler-steps", type=int, help="euler steps of generation and inversion")
    p.add_argument("--encode-steps", type=int, help="steps of the iterative encoders")
    p.add_argument("--tag", default="", help="file-name suffix")
    p.add_argument("--encoders", nargs="+", choices=ENCODERS + (ORACLE,), default=list(ENCODERS),
                   help=f"{ORACLE}: invert the sampler's own latent (no VAE), the upper bound; with --attacks none")
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    p.add_argument("--out", type=Path, help="output folder (default bench/results; --quick: a new temp folder)")
    args = p.parse_args(argv)
    setup = QUICK if args.quick else Setup()
    chosen = {k: getattr(args, k) for k in ("n", "keys", "radius", "sampler_steps", "encode_steps")}
    setup = Setup(**{**setup.__dict__, **{k: v for k, v in chosen.items() if v is not None}})
    out = args.out or (Path(tempfile.mkdtemp(prefix="watermark-")) if args.quick else REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = boot(args.threads)
    pack = Pack(env)
    from tests.support.diffusion import empty_conditioning, trained_model
    from tests.support.models import kl_f8_small_vae

    model, vae, cond = trained_model(), kl_f8_small_vae(), empty_conditioning()
    _, slug, device_name = device_info()
    date = datetime.date.today().isoformat()
    stem = out / f"{date}-{slug}-watermark{'-quick' if args.quick else ''}{'-' + args.tag if args.tag else ''}"
    with tempfile.TemporaryDirectory() as pngs:
        sets, ring, rand = make_sets(pack, model, vae, cond, setup, Path(pngs))
    result = {"setup": setup.__dict__, "counts": {k: int(v["images"].shape[0]) for k, v in sets.items()},
              "attacks": args.attacks, "encoders": args.encoders, "rows": [],
              "keys": {"ring": ring.to_dict(), "rand": [k.to_dict() for k in rand]}}
    for a, attack_name in enumerate(args.attacks):
        attacked = {name: attack(s["images"], attack_name, seed=setup.seed + 100 * a + i)
                    for i, (name, s) in enumerate(sets.items())}
        for encoder in args.encoders:
            for row in run_cell(pack, model, vae, cond, sets, attacked, encoder, setup, ring, rand):
                result["rows"].append({"attack": attack_name, **row})
                print(json.dumps(result["rows"][-1]), flush=True)
            result["meta"] = {"date": date, "device": device_name, "git": git_state(),
                              "command": " ".join(["python -m bench.watermark"] + (argv if argv is not None
                                                                                   else sys.argv[1:])),
                              "seconds": time.perf_counter() - start, "complete": False}
            stem.with_suffix(".json").write_text(json.dumps(result, indent=1))  # partial results survive a kill
    result["meta"]["complete"] = True
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
