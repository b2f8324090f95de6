"""What checkpointing a decoder's blocks would save (issue 12, item 5): the live-tensor peak and time of one backward of
the pixel loss through the full-size random SD decoder, plain and with each block's activations recomputed in the
backward (torch.utils.checkpoint). The solver does not do this yet (docs/convergence.md, "The rival's memory").

    .venv/bin/python -m bench.checkpoint_probe 256 512
"""
from __future__ import annotations

import copy
import json
import sys
import time

import torch
from torch.utils.checkpoint import checkpoint

from .environment import boot
from .measure import load_vae
from .memory import LiveTensorPeak

LEAVES = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


def blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The innermost modules with two or more convolutions / linear maps of their own (SD: ResnetBlock, AttnBlock)."""
    inner = [b for child in module.children() for b in blocks(child)]
    if inner:
        return inner
    return [module] if sum(isinstance(c, LEAVES) for c in module.children()) >= 2 else []


def checkpointed(module: torch.nn.Module) -> None:
    """Recompute `module`'s activations in the backward instead of keeping them."""
    forward = module.forward

    def recomputed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = recomputed


def backward_peak(model, z: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(live-tensor peak MiB, seconds, gradient) of one backward of sum(D(z)^2), after one warm-up."""
    def step():
        zg = z.clone().requires_grad_(True)
        return torch.autograd.grad(model.decode(zg).square().sum(), zg)[0]

    step()
    t = time.perf_counter()
    with LiveTensorPeak(z.device) as live:
        grad = step()
    return live.peak_mb, time.perf_counter() - t, grad


def probe(size: int) -> dict:
    model = copy.deepcopy(load_vae("random_sd").first_stage_model).float().requires_grad_(False)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    plain_mb, plain_s, plain_grad = backward_peak(model, z)
    wrapped = blocks(model.decoder)
    for b in wrapped:
        checkpointed(b)
    ckpt_mb, ckpt_s, ckpt_grad = backward_peak(model, z)
    return dict(size=size, blocks=len(wrapped), plain_live_mb=round(plain_mb, 1),
                checkpointed_live_mb=round(ckpt_mb, 1), ratio=round(ckpt_mb / plain_mb, 3), plain_s=round(plain_s, 2),
                checkpointed_s=round(ckpt_s, 2),
                same_gradient=bool(torch.allclose(plain_grad, ckpt_grad, rtol=1e-4, atol=1e-4)))


def main(argv=None) -> int:
    sizes = [int(s) for s in (argv if argv is not None else sys.argv[1:])] or [256]
    boot(2)
    for size in sizes:
        print(json.dumps(probe(size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
