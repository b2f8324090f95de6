"""What recomputing a decoder's blocks saves (issue 12, item 5): the live-tensor peak and time of one backward of the
pixel loss through the full-size random SD decoder (the ComfyUI adapter's differentiable decode), with its blocks'
activations kept and recomputed (core.checkpointing, InversionOptions.checkpoint), beside core's estimate of each
before running (core.hybrid.backward_activation_mb: what the rival's and the hybrid's memory check compares with).

    .venv/bin/python -m bench.checkpoint_probe 256 512
    .venv/bin/python -m bench.checkpoint_probe 64 128 --models taef2 kl_f8_small   # the shared pretrained VAEs
"""
from __future__ import annotations

import argparse
import importlib
import json
import time

import torch

from .environment import boot
from .measure import MODELS, load_vae
from .memory import LiveTensorPeak


def backward_peak(decode, z: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(live-tensor peak MiB, seconds, gradient) of one backward of sum(D(z)^2), after one warm-up."""
    def step():
        zg = z.clone().requires_grad_(True)
        return torch.autograd.grad(decode(zg).square().sum(), zg)[0]

    step()
    t = time.perf_counter()
    with LiveTensorPeak(z.device) as live:
        grad = step()
    return live.peak_mb, time.perf_counter() - t, grad


def probe(ctx, vae, model: str, size: int) -> dict:
    checkpointing = importlib.import_module(ctx.core.__name__ + ".checkpointing")
    hybrid = importlib.import_module(ctx.core.__name__ + ".hybrid")
    codec = ctx.adapter.vae_codec(vae, "fp32")
    decode = codec.differentiable_decode()
    with torch.inference_mode():
        z = codec.encode(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
    plain_mb, plain_s, plain_grad = backward_peak(decode, z)
    with checkpointing.recomputing():
        ckpt_mb, ckpt_s, ckpt_grad = backward_peak(decode, z)
    return dict(model=model, size=size, blocks=checkpointing.recomputed_blocks(decode),
                plain_live_mb=round(plain_mb, 1),
                checkpointed_live_mb=round(ckpt_mb, 1), ratio=round(ckpt_mb / plain_mb, 3),
                plain_estimate_mb=round(hybrid.backward_activation_mb(decode, z), 1),
                checkpointed_estimate_mb=round(hybrid.backward_activation_mb(decode, z, recompute=True), 1),
                plain_s=round(plain_s, 2), checkpointed_s=round(ckpt_s, 2),
                same_gradient=bool(torch.allclose(plain_grad, ckpt_grad, rtol=1e-4, atol=1e-4)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[256], help="image sizes (px)")
    parser.add_argument("--models", nargs="+", default=["random_sd"], choices=MODELS)
    args = parser.parse_args(argv)
    ctx = boot(2)
    for model in args.models:
        vae = load_vae(model)
        for size in args.sizes:
            print(json.dumps(probe(ctx, vae, model, size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
