"""The pack keeps working on the newest ComfyUI where docs/compat.md found a change, and still on
0.3.75 (the host these tests run on). The newer host behaviour is put in place on the real 0.3.75
modules the way the newest source has it (names and semantics quoted in docs/compat.md), then
undone by monkeypatch."""
from __future__ import annotations

import importlib

import pytest


@pytest.fixture(scope="module")
def adapter(host):
    return importlib.import_module(host.pack.__name__ + ".nodes.adapter")


@pytest.fixture(scope="module")
def inversion(host):
    return importlib.import_module(host.pack.__name__ + ".nodes.diffusion_inversion")


def test_out_of_memory_on_0_3_75_is_its_oom_exception_only(adapter):
    import comfy.model_management as mm

    assert not hasattr(mm, "is_oom")  # the 0.3.75 host: the fallback path below is the one taken
    assert adapter.is_oom(mm.OOM_EXCEPTION("CUDA out of memory"))
    assert not adapter.is_oom(RuntimeError("shape mismatch"))


def test_out_of_memory_on_newer_comfyui_asks_its_is_oom(adapter, monkeypatch):
    """Newer ComfyUI also counts a torch.AcceleratorError whose text says out of memory."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "is_oom", lambda e: isinstance(e, mm.OOM_EXCEPTION) or "out of memory" in str(e).lower(),
                        raising=False)
    assert adapter.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not adapter.is_oom(RuntimeError("shape mismatch"))


class _Model:
    def __init__(self, sampling):
        self.sampling = sampling

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.sampling


@pytest.mark.parametrize("name", ["IMG_TO_IMG_FLOW", "IMG_TO_IMG_VELOCITY"])
def test_image_to_image_flow_sampling_of_newer_comfyui_is_refused_by_name(inversion, monkeypatch, name):
    """In the newest comfy/model_sampling.py these subclass CONST but their noise_scaling returns the
    latent and drops the noise: dividing the noise scale out would divide by zero."""
    import comfy.model_sampling as ms

    newer = type(name, (ms.CONST,), {"noise_scaling": lambda self, sigma, noise, latent, max_denoise=False: latent})
    monkeypatch.setattr(ms, name, newer, raising=False)
    with pytest.raises(ValueError, match=f"model: its sampling type \\({name}\\) is not supported"):
        inversion.model_kind(_Model(newer()))
    assert inversion.model_kind(_Model(type("Flow", (ms.CONST,), {})())) == "flow"  # plain flow still works


def test_vae_with_a_post_processed_encoder_output_is_refused(adapter, host):
    """Newer comfy/sd.py VAEs may set format_encoded (applied after first_stage_model.encode)."""
    from tests.support.models import random_taesd_vae

    vae = random_taesd_vae(seed=3)
    adapter.check_supported(vae)  # a 0.3.75 VAE: accepted
    vae.format_encoded = lambda samples: samples * 2
    with pytest.raises(adapter.UnsupportedVAE, match="use the stock 'VAE Encode'"):
        adapter.check_supported(vae)


def test_vae_with_chunked_encoder_io_is_refused(adapter, host):
    from tests.support.models import random_taesd_vae

    vae = random_taesd_vae(seed=4)
    vae.first_stage_model.comfy_has_chunked_io = True
    with pytest.raises(adapter.UnsupportedVAE, match="chunked or post-processed"):
        adapter.check_supported(vae)
