"""What recomputing a decoder's blocks saves (issue 12, item 5): the live-tensor peak and time of one backward of the
pixel loss through the full-size random SD decoder (the ComfyUI adapter's differentiable decode), with its blocks'
activations kept and recomputed (core.checkpointing, InversionOptions.checkpoint), beside core's estimate of each
before running (core.hybrid.backward_activation_mb: what the rival's and the hybrid's memory check compares with).

    .venv/bin/python -m bench.checkpoint_probe 256 512
"""
from __future__ import annotations

import importlib
import json
import sys
import time

import torch

from .environment import boot
from .measure import load_vae
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


def probe(ctx, size: int) -> dict:
    checkpointing = importlib.import_module(ctx.core.__name__ + ".checkpointing")
    hybrid = importlib.import_module(ctx.core.__name__ + ".hybrid")
    decode = ctx.adapter.vae_codec(load_vae("random_sd"), "fp32").differentiable_decode()
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    plain_mb, plain_s, plain_grad = backward_peak(decode, z)
    with checkpointing.recomputing():
        ckpt_mb, ckpt_s, ckpt_grad = backward_peak(decode, z)
    return dict(size=size, blocks=checkpointing.recomputed_blocks(decode), plain_live_mb=round(plain_mb, 1),
                checkpointed_live_mb=round(ckpt_mb, 1), ratio=round(ckpt_mb / plain_mb, 3),
                plain_estimate_mb=round(hybrid.backward_activation_mb(decode, z), 1),
                checkpointed_estimate_mb=round(hybrid.backward_activation_mb(decode, z, recompute=True), 1),
                plain_s=round(plain_s, 2), checkpointed_s=round(ckpt_s, 2),
                same_gradient=bool(torch.allclose(plain_grad, ckpt_grad, rtol=1e-4, atol=1e-4)))


def main(argv=None) -> int:
    sizes = [int(s) for s in (argv if argv is not None else sys.argv[1:])] or [256]
    ctx = boot(2)
    for size in sizes:
        print(json.dumps(probe(ctx, size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
