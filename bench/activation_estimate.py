"""The backward-pass activations the default's rival (and the hybrid) would keep, as core estimates them before
running (core.hybrid.backward_activation_mb: saved tensors at two small crops, extrapolated in area), per VAE and
size; the rival runs a sample and its twin, so twice that. What memory_limit_mb (0: the device's free memory,
core.hybrid.free_memory_mb) is compared with.

    .venv/bin/python -m bench.activation_estimate random_sd,taef2,kl_f8_small 512,1024,2048
"""
from __future__ import annotations

import importlib
import sys

import torch

from .environment import boot
from .measure import load_vae


def main(argv=None) -> int:
    models, sizes = (argv or sys.argv[1:])[:2]
    ctx = boot(2)
    hybrid = importlib.import_module(ctx.core.__name__ + ".hybrid")
    print(f"free memory here: {hybrid.free_memory_mb('cpu'):.0f} MiB\n")
    print("| VAE | size | one sample's backward (MiB) | the rival: sample + twin (MiB) |\n|---|---|---|---|")
    for model in models.split(","):
        codec = ctx.adapter.vae_codec(load_vae(model), "fp32", (1, 3, 64, 64))
        with torch.inference_mode():
            channels = codec.encode(torch.rand(1, 3, 64, 64)).shape[1]
        for px in map(int, sizes.split(",")):
            mb = hybrid.backward_activation_mb(codec.differentiable_decode(),
                                               torch.zeros(1, channels, px // 8, px // 8))
            print(f"| {model} | {px} | {mb:.0f} | {2 * mb:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
