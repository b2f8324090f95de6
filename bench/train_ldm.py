"""Train the tiny latent diffusion model of the watermark evaluation (issue 15), on CPU.

    .venv/bin/python -m bench.train_ldm                      # the committed weights: 8000 steps
    .venv/bin/python -m bench.train_ldm --steps 30 --out /tmp/x   # the first steps only (tests)

An eps-prediction UNet of ComfyUI's own SD1.x-family class (tests/support/diffusion.py:
TRAINED_UNET_CONFIG, 6.5 M parameters) learns to denoise kl_f8_small latents (the shared VAE) of
CC0 / public-domain photos: the four shared photos and scikit-image's bundled ones, resized so the
short side is 64..256 px, both horizontal flips, random 8 x 8 latent crops (64 px images). The
conditioning is fixed and empty (zeros): the model is unconditional. The noise schedule is SD1.5's
(ComfyUI's ModelSamplingDiscrete, 1000 steps, scaled-linear betas), so ComfyUI samples it with
its usual samplers. Everything is seeded: the same command gives the same loss curve on the same
machine (float sums differ in the last bits across thread counts).

Writes to --out (default tests/data/tiny_ldm/): tiny_ldm.safetensors (EMA weights, fp16; metadata:
scale_factor, steps, seconds, eval_loss), loss.csv, loss.png, samples.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.support.diffusion import CONTEXT_DIM

from .environment import DEFAULT_THREADS, REPO, boot

OUT = REPO / "tests" / "data" / "tiny_ldm"
SCALES = (64, 96, 128, 192, 256)  # short side of the resized photos, px
LATENT = 8  # latent crop side (64 px)
# scikit-image's bundled photos (CC0 / public domain, see its data/README); gray ones become RGB.
SKIMAGE_PHOTOS = ("hubble_deep_field", "immunohistochemistry", "stereo_motorcycle", "retina", "cat",
                  "camera", "brick", "grass", "gravel", "coins", "moon")
EVAL_SEED, EVAL_CROPS = 12345, 1024


def photos() -> list[tuple[str, np.ndarray]]:
    """(name, H x W x 3 uint8) for every training photo."""
    import skimage.data

    from tests.support.paths import image_paths

    out = [(p.stem, np.asarray(Image.open(p).convert("RGB"))) for p in image_paths()]
    for name in SKIMAGE_PHOTOS:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        out.append((name, np.ascontiguousarray(img.astype(np.uint8))))
    return out


def latent_maps(vae, images) -> list[torch.Tensor]:
    """kl_f8_small latents (4, h, w) of every photo at every scale, with its mirror image."""
    maps = []
    with torch.inference_mode():
        for _, img in images:
            h, w = img.shape[:2]
            for short in SCALES:
                size = (round(w * short / min(h, w) / 8) * 8, round(h * short / min(h, w) / 8) * 8)
                small = np.asarray(Image.fromarray(img).resize(size, Image.LANCZOS), dtype=np.float32) / 255.0
                pixels = torch.from_numpy(small)[None]
                for flip in (False, True):
                    z = vae.encode(pixels.flip(2) if flip else pixels)
                    maps.append(z[0].float().clone())
    return maps


def crops(maps, n: int, g: torch.Generator) -> torch.Tensor:
    """n random LATENT x LATENT windows, each from a uniformly drawn map."""
    idx = torch.randint(len(maps), (n,), generator=g)
    out = []
    for i in idx.tolist():
        m = maps[i]
        top = int(torch.randint(m.shape[1] - LATENT + 1, (1,), generator=g))
        left = int(torch.randint(m.shape[2] - LATENT + 1, (1,), generator=g))
        out.append(m[:, top:top + LATENT, left:left + LATENT])
    return torch.stack(out)


def initial_weights(unet, seed: int) -> dict:
    """Fan-in-scaled normals (tests/support/diffusion.py), output conv at zero: the untrained model
    predicts eps = 0 (ComfyUI's layers skip init, they expect a checkpoint)."""
    from tests.support.diffusion import seeded_unet_weights

    w = seeded_unet_weights(unet.state_dict(), seed)
    w["out.2.weight"].zero_()
    return w


def noised(x0, t, eps, alphas_cumprod):
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def eval_loss(unet, maps, scale, alphas_cumprod) -> float:
    """Mean eps-MSE on a fixed seeded set: EVAL_CROPS crops, timesteps on a uniform grid, fixed noise."""
    g = torch.Generator().manual_seed(EVAL_SEED)
    x0 = crops(maps, EVAL_CROPS, g) * scale
    t = torch.linspace(0, len(alphas_cumprod) - 1, EVAL_CROPS).round().long()
    eps = torch.randn(x0.shape, generator=g)
    total = 0.0
    with torch.inference_mode():
        for i in range(0, EVAL_CROPS, 256):
            sl = slice(i, i + 256)
            ctx = torch.zeros(x0[sl].shape[0], 1, CONTEXT_DIM)
            pred = unet(noised(x0[sl], t[sl], eps[sl], alphas_cumprod), t[sl].float(), context=ctx)
            total += float((pred - eps[sl]).pow(2).sum())
    return total / eps.numel()


def alphas_cumprod(model_sampling) -> torch.Tensor:
    """SD1.5's cumulative alphas from ComfyUI's model_sampling (sigma^2 = (1 - a) / a)."""
    return (1.0 / (1.0 + model_sampling.sigmas.double() ** 2)).float()


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine to lr / 10 (the first `warmup` steps do not depend on `steps`)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args, maps, scale, model) -> tuple[dict, list[float], float]:
    unet = model.diffusion_model
    schedule = alphas_cumprod(model.model_sampling)
    with torch.inference_mode(False):
        unet.load_state_dict(initial_weights(unet, args.seed))
        unet.train()
        ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(args.seed + 1)
        ctx = torch.zeros(args.batch, 1, CONTEXT_DIM)
        losses, start = [], time.time()
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
            x0 = crops(maps, args.batch, g) * scale
            t = torch.randint(len(schedule), (args.batch,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            loss = (unet(noised(x0, t, eps, schedule), t.float(), context=ctx) - eps).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                decay = min(args.ema, (1 + step) / (10 + step))  # EMA warm-up: early steps count more
                for k, v in unet.state_dict().items():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            losses.append(float(loss.detach()))
            if (step + 1) % 250 == 0 or step + 1 == args.steps:
                recent = sum(losses[-250:]) / len(losses[-250:])
                print(f"step {step + 1}/{args.steps}  loss(avg 250) {recent:.4f}  {time.time() - start:.0f} s",
                      flush=True)
        seconds = time.time() - start
        unet.load_state_dict(ema)
        unet.eval()
    return ema, losses, seconds


def write_loss(out: Path, losses: list[float]) -> None:
    with open(out / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows([i + 1, f"{v:.6f}"] for i, v in enumerate(losses))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(losses) + 1)
    window = max(1, min(250, len(losses) // 10))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(steps, losses, color="0.8", lw=0.5, label="batch loss")
    ax.plot(steps[window - 1:], smooth, color="C0", label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="eps MSE", yscale="log", title="tiny_ldm training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png")
    plt.close(fig)


def sample_grid(path: Path, model_patcher, vae, n: int = 16, steps: int = 20, seed: int = 0) -> None:
    """n unconditional 64 px samples (euler, `steps`, normal schedule, cfg 1) through ComfyUI's own
    sampler, decoded by kl_f8_small, in a 4-wide grid."""
    import comfy.sample

    from tests.support.diffusion import empty_conditioning

    pos, neg = empty_conditioning()
    empty = torch.zeros(n, 4, LATENT, LATENT)
    noise = comfy.sample.prepare_noise(empty, seed)
    with torch.inference_mode():
        latent = comfy.sample.sample(model_patcher, noise, steps, 1.0, "euler", "normal", pos, neg, empty,
                                     disable_pbar=True, seed=seed)
        images = vae.decode(latent).clamp(0, 1)  # (n, 64, 64, 3)
    rows = [torch.cat(list(images[i:i + 4]), dim=1) for i in range(0, n, 4)]
    grid = (torch.cat(rows, dim=0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_ldm", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--no-samples", action="store_true", help="skip samples.png (tests)")
    args = p.parse_args(argv)
    boot(args.threads)
    import comfy.model_management
    import comfy.model_patcher
    from safetensors.torch import save_file

    from tests.support.diffusion import trained_model_object
    from tests.support.models import kl_f8_small_vae

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    vae = kl_f8_small_vae()
    images = photos()
    maps = latent_maps(vae, images)
    std = float(torch.cat([m.flatten() for m in maps]).std())
    scale = 1.0 / std  # the latent format's scale factor: unit-variance latents for the UNet
    print(f"{len(images)} photos, {len(maps)} latent maps, latent std {std:.4f} -> scale factor {scale:.5f}",
          flush=True)
    model = trained_model_object(scale)
    ema, losses, seconds = train(args, maps, scale, model)
    weights = {k: v.half().contiguous() for k, v in ema.items()}  # what the file holds: evaluate that
    with torch.inference_mode(False):
        model.diffusion_model.load_state_dict({k: v.float() for k, v in weights.items()})
    ev = eval_loss(model.diffusion_model, maps, scale, alphas_cumprod(model.model_sampling))
    meta = {"scale_factor": f"{scale:.8f}", "steps": str(args.steps), "batch": str(args.batch),
            "lr": str(args.lr), "seed": str(args.seed), "train_seconds": f"{seconds:.1f}",
            "eval_loss": f"{ev:.6f}", "torch": torch.__version__, "threads": str(args.threads),
            "photos": ",".join(n for n, _ in images), "config": json.dumps(
                {k: v for k, v in model.model_config.unet_config.items() if k != "dtype"})}
    save_file(weights, str(args.out / "tiny_ldm.safetensors"), meta)
    write_loss(args.out, losses)
    print(f"trained {args.steps} steps in {seconds:.0f} s; EMA eval loss {ev:.4f}; wrote {args.out}", flush=True)
    if not args.no_samples:
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        sample_grid(args.out / "samples.png", patcher, vae)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
