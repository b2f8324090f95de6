"""The ComfyUI adapter's differentiable decode recomputes the real decoders' blocks (core.checkpointing) for the
same gradient, keeping fewer activations: TAEF2 and the SD-architecture kl-f8, as ComfyUI loads them."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("which", ["taef2", "kl_small"])
def test_the_adapters_decode_recomputes_its_blocks_for_the_same_gradient(which, request, pack):
    checkpointing, hybrid = pack("core.checkpointing"), pack("core.hybrid")
    vae = request.getfixturevalue(which)
    codec = pack("nodes.adapter").vae_codec(vae, "fp32")
    decode = codec.differentiable_decode()
    model = vae.first_stage_model
    decoder = getattr(model, "decoder", None) or model.taesd_decoder
    # the decoder's blocks only: the encoder's never run in a decode
    assert checkpointing.recomputed_blocks(decode) == len(checkpointing.blocks(decoder)) >= 4
    assert len(checkpointing.blocks(model)) > len(checkpointing.blocks(decoder))
    with torch.inference_mode():
        channels = codec.encode(torch.rand(1, 3, 64, 64)).shape[1]
    z = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(0))

    def grad():
        zg = z.clone().requires_grad_(True)
        return torch.autograd.grad(decode(zg).square().sum(), zg)[0]

    kept = grad()
    with checkpointing.recomputing():
        recomputed = grad()
    assert torch.allclose(recomputed, kept, rtol=1e-4, atol=1e-5)
    assert hybrid.backward_activation_mb(decode, z, recompute=True) < 0.8 * hybrid.backward_activation_mb(decode, z)
