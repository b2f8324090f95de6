"""exact_encode.adapters.diffusers against ComfyUI on the same weights: the shared kl_f8_small
(LDM keys, config.json) converted offline into diffusers' AutoencoderKL."""
from __future__ import annotations

import re

import pytest
import torch

from tests.support.library import exact_encode, readme_block, one_torch_thread_fixture
from tests.support.paths import require

ee = exact_encode()
one_torch_thread = one_torch_thread_fixture()
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def kl_diffusers():
    from exact_encode.adapters.vae_files import load_vae

    loaded = load_vae(require("models/kl_f8_small"))
    assert loaded.kind == "kl" and loaded.latent_format == "raw"  # a config.json VAE: ComfyUI's raw latent
    return loaded.model


def gains(summary: str) -> list[float]:
    return [float(g) for g in re.findall(r"\(([+-]\d+\.\d+) dB\)", summary)]


def test_exact_latent_decodes_the_same_through_diffusers_and_comfyui(kl_diffusers, kl_small, stock, photos64):
    from exact_encode.adapters.diffusers import diffusers_codec

    sd_scale = 0.18215  # an SD 1.x convention, to check the factors are applied as pipelines do
    codec = diffusers_codec(kl_diffusers, scaling_factor=sd_scale, shift_factor=0.1)
    photo = photos64["astronaut"]  # (1, H, W, 3)
    result = ee.invert(codec, photo.movedim(-1, 1), method="anderson", steps=8)
    assert result.samples[0].gain_db > 0.1
    with torch.inference_mode():
        ours = codec.decode(result.latent).movedim(1, -1)
    theirs = stock.decode(kl_small, {"samples": result.latent / sd_scale + 0.1})
    assert (ours - theirs).abs().max().item() < 2e-4
    # and the plain encoders agree, in that convention
    plain = stock.encode(kl_small, photo)["samples"]
    with torch.inference_mode():
        assert torch.allclose(codec.encode(photo.movedim(-1, 1)), (plain - 0.1) * sd_scale, atol=1e-4)


def test_gain_and_latent_equal_the_nodes_on_the_same_photo(kl_diffusers, kl_small, stock, run_node, photos64):
    from exact_encode.adapters.diffusers import diffusers_codec

    # The decoded photo: an image the decoder can reach, so the gain is large enough to compare.
    target = stock.decode(kl_small, stock.encode(kl_small, photos64["coffee"]))
    # select="pixel": a float image has no noise floor, so auto would use the twin, whose pick can move by an
    # iteration between two codecs that differ in rounding; the pixel-best iterate compares the adapters
    latent, summary = run_node(target, kl_small, steps=10, method="anderson", check_assumption=False, select="pixel")
    result = ee.invert(diffusers_codec(kl_diffusers), target.movedim(-1, 1), method="anderson", steps=10,
                       select="pixel")
    (node_gain,) = gains(summary)
    assert node_gain > 1.0
    assert result.samples[0].gain_db == pytest.approx(node_gain, abs=0.02)  # the summary rounds to 0.01
    assert torch.allclose(result.latent, latent["samples"], atol=1e-3, rtol=0)  # raw convention: same latent


def test_readme_diffusers_snippet_runs(kl_diffusers, monkeypatch, tmp_path):
    """The README's img2img-style example, with the shared small VAE in place of a hub download."""
    import diffusers

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained",
                        classmethod(lambda cls, *a, **k: kl_diffusers))
    from PIL import Image

    Image.fromarray((torch.rand(48, 40, 3) * 255).byte().numpy()).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    code = readme_block("test: readme-diffusers")
    assert "steps=50" in code
    exec(compile(code.replace("steps=50", "steps=3"), "README.md", "exec"), scope)
    assert scope["latents"].shape == (1, 4, 6, 5)
    assert scope["result"].samples[0].psnr_best >= scope["result"].samples[0].psnr_initial


def _save(sd: dict, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous().float() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("kind", ["flux_ae", "taesd"])
def test_single_files_load_like_comfyui(host, stock, kind, tmp_path):
    """Seeded random weights in ComfyUI's single-file layouts (FLUX.1 ae: 16 channels, no quant
    convs; TAESD: taesd_encoder./taesd_decoder. keys): the diffusers model built by load_vae encodes
    and decodes like ComfyUI's own VAE from the same file, in the stated latent convention."""
    import comfy.sd
    from comfy.taesd.taesd import TAESD

    from exact_encode.adapters.diffusers import diffusers_codec
    from exact_encode.adapters.vae_files import LATENT_FORMATS, load_vae
    from tests.support import models

    if kind == "flux_ae":
        sd, path, fmt = models._random_kl_state_dict(16, seed=3), tmp_path / "ae.safetensors", "flux"
    else:
        sd, path, fmt = (models.seeded_weights(TAESD(latent_channels=4).state_dict(), 4),
                         tmp_path / "taesd.safetensors", "sd1")
    _save(sd, path)
    comfy_vae = comfy.sd.VAE(sd=sd)
    loaded = load_vae(path)
    assert loaded.latent_format == fmt
    scale, shift = LATENT_FORMATS[fmt] if kind == "flux_ae" else (1.0, 0.0)  # TAESD latents come scaled
    codec = diffusers_codec(loaded.model)
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = codec.encode(image.movedim(-1, 1))
        theirs = (stock.encode(comfy_vae, image)["samples"] - shift) * scale
        assert (ours - theirs).abs().max().item() < 1e-3 * max(1.0, theirs.abs().max().item())
        decoded = codec.decode(ours).movedim(1, -1)
    assert (decoded - stock.decode(comfy_vae, {"samples": ours / scale + shift})).abs().max().item() < 1e-3


def test_kl_shapes_alone_give_the_config_architecture(kl_diffusers, tmp_path):
    """kl_f8_small without its config.json: the architecture read from the tensor shapes is the same."""
    from exact_encode.adapters.vae_files import load_vae

    lone = tmp_path / "vae.safetensors"
    lone.symlink_to(require("models/kl_f8_small") / "kl_f8_small.safetensors")
    model = load_vae(lone, latent_format="raw").model
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(model.decode(z).sample, kl_diffusers.decode(z).sample, atol=1e-5)
