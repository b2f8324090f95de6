"""VAE Decode (Exact Tiled) on the real ComfyUI 0.3.75 host: it decodes on exactly the grid that
VAE Exact Encode (Tiled) inverted, so a tiled exact encode round-trips through it (real TAEF2)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.support.images import load_photo
from tests.support.paths import image_paths


def psnr(a, b):
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(1 / mse) if mse > 0 else math.inf


@pytest.fixture(scope="module")
def mods(pack):
    return {k: pack(m) for k, m in [("dec", "nodes.decode_tiled"), ("enc", "nodes.exact_encode_tiled"),
                                    ("tiling", "core.tiling"), ("adapter", "nodes.adapter")]}


def decode(mods, latent, vae, tile_size, overlap):
    with torch.inference_mode():
        return mods["dec"].VAEDecodeExactTiled.execute(latent, vae, tile_size, overlap).result[0]


def encode(mods, image, vae, tile_size, overlap, steps, **kw):
    with torch.inference_mode():
        return mods["enc"].VAEExactEncodeTiled.execute(image, vae, tile_size, overlap, 64, 8, steps, "anderson",
                                                       **kw).result


def test_schema_matches_the_tiled_encoder(mods):
    """Same tile inputs, defaults, limits and steps as VAE Exact Encode (Tiled)."""
    def tile_inputs(node):
        return [(i.id, i.default, i.min, i.max, i.step) for i in node.define_schema().inputs
                if i.id in ("tile_size", "overlap")]

    schema = mods["dec"].VAEDecodeExactTiled.define_schema()
    assert schema.node_id == "VAEDecodeExactTiled" and schema.display_name == "VAE Decode (Exact Tiled)"
    assert tile_inputs(mods["dec"].VAEDecodeExactTiled) == tile_inputs(mods["enc"].VAEExactEncodeTiled)
    assert [(i.id, i.default) for i in schema.inputs if i.id in ("tile_size", "overlap")] == [
        ("tile_size", 512), ("overlap", 64)]


@pytest.mark.slow
def test_tiled_exact_encode_round_trips_through_the_matching_decoder(mods, taef2, stock, host):
    """TAEF2, 256 px photo, tiles of 128 px with 32 px overlap (3 x 3 tiles), 2 anderson steps, the rival off (what
    is checked is the decoder's grid; the rival ran per tile, 44 s of the node's 56 s here; video tests run it tiled).
    The node's decode equals core.tiling.tiled_codec(...).decode bit for bit; its PSNR is at least
    the plain tiled encode's through the same decoder, and above stock VAE Decode (Tiled) and the
    whole VAE Decode of the same latent (TAEF2's GroupNorm: tiles decode differently)."""
    tiling, adapter = mods["tiling"], mods["adapter"]
    image = load_photo(image_paths()[0], 256)
    latent, summary = encode(mods, image, taef2, 128, 32, steps=2, rival="off")
    out = decode(mods, latent, taef2, 128, 32)
    with torch.inference_mode():
        grid = tiling.tiled_codec(adapter.vae_codec(taef2), (32, 32), 8, 16, 4)
        assert len(tiling.TileGrid(32, 32, 16, 4, 8)) == 9
        expected = grid.decode(latent["samples"]).movedim(1, -1)
        plain = {"samples": grid.encode(image.movedim(-1, 1))}  # the tiled encoder E_t(x), not inverted
        stock_tiled = host.nodes.VAEDecodeTiled().decode(taef2, latent, 128, 32, 64, 8)[0]
    assert out.shape == image.shape and out.dtype == torch.float32
    assert torch.equal(out, expected)
    p_node, p_plain = psnr(out, image), psnr(decode(mods, plain, taef2, 128, 32), image)
    p_stock_tiled, p_whole = psnr(stock_tiled, image), psnr(stock.decode(taef2, latent), image)
    print(f"TAEF2 256px tiles 128/32, 2 steps: exact tiled encode -> this node {p_node:.2f} dB, -> stock VAE Decode "
          f"(Tiled) {p_stock_tiled:.2f}, -> VAE Decode {p_whole:.2f}; plain tiled encode -> this node {p_plain:.2f}")
    assert p_node >= p_plain + 0.5, (p_node, p_plain)  # the inversion's gain shows through this decoder
    assert p_node > p_stock_tiled and p_node > p_whole


def test_video_latent_is_decoded_tiled_in_space_whole_in_time(mods, host, stock):
    """Random Wan 2.1 (width 8), 5 frames of 96 px, tiles 64/32 px: stock VAE Decode's IMAGE layout
    (frames as a batch) and exactly the tiled codec's decode."""
    from tests.support import models

    with torch.inference_mode():
        vae = models.random_wan21_vae(0)
        latent = stock.encode(vae, torch.rand(5, 96, 96, 3))
        out = decode(mods, latent, vae, 64, 32)
        codec = mods["tiling"].tiled_codec(mods["adapter"].vae_codec(vae), (12, 12), 8, 8, 4)
        expected = codec.decode(latent["samples"])[0].movedim(0, -1)
    assert out.shape == stock.decode(vae, latent).shape == (5, 96, 96, 3)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("tile_size, overlap", [(64, 64), (64, 128), (32, 0), (100, 32), (128, 20)])
def test_bad_tiles_give_the_encoders_errors(tile_size, overlap, mods, taef2, photos64):
    latent = {"samples": torch.zeros(1, taef2.latent_channels, 8, 8)}
    with pytest.raises(ValueError) as enc_err:
        encode(mods, photos64["coffee"], taef2, tile_size, overlap, steps=1)
    with pytest.raises(ValueError) as dec_err:
        decode(mods, latent, taef2, tile_size, overlap)
    assert str(dec_err.value) == str(enc_err.value)
    assert str(dec_err.value).startswith(("tile_size:", "overlap:"))


def test_latent_of_another_vae_is_a_clear_error(mods, taef2):
    with pytest.raises(ValueError, match=r"samples: got a latent of shape \(1, 4, 8, 8\).*decodes 4-D latents with "
                                         rf"{taef2.latent_channels} channels"):
        decode(mods, {"samples": torch.zeros(1, 4, 8, 8)}, taef2, 512, 64)
