"""The pack keeps working on the newest ComfyUI where docs/compat.md found a change, and still on
0.3.75 (the host these tests run on). The newer host behaviour is put in place on the real 0.3.75
modules the way the newest source has it (names and semantics quoted in docs/compat.md), then
undone by monkeypatch."""
from __future__ import annotations

import importlib

import pytest
import torch


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


def test_the_free_memory_cap_asks_the_vaes_patcher_on_newer_comfyui(adapter, taef2, monkeypatch):
    """Newer ComfyUI's own VAE decode sizes its batches by vae.patcher.get_free_memory(device): under dynamic VRAM the
    global estimate leaves out pageable weights. On 0.3.75 the patcher has no such method (the global one is used,
    tests/test_node_stop_inputs.py)."""
    assert not hasattr(taef2.patcher, "get_free_memory")
    asked = []
    monkeypatch.setattr(type(taef2.patcher), "get_free_memory",
                        lambda self, device: asked.append(device) or 3 * 2**30, raising=False)
    assert adapter.memory_cap_mb(taef2, 0) == 3 * 1024.0
    assert asked == [taef2.device]
    assert adapter.memory_cap_mb(taef2, 300) == 300.0  # the user's cap still comes first


@pytest.mark.parametrize("method", ["anderson", "diis", "gradient"])
def test_newer_comfyuis_in_place_process_output_gives_the_same_latent(run_node, kl_small, photos64, monkeypatch,
                                                                      method):
    """Newest comfy/sd.py: process_output = lambda image: image.add_(1.0).div_(2.0).clamp_(0.0, 1.0), in place where
    0.3.75 made a new tensor. The pack's decodes feed it the decoder's output, under inference_mode (fixed-point steps)
    and under autograd (gradient steps, the default's rival): in place must neither fail there nor change the
    result."""
    image = photos64["chelsea"][:, :32, :32]
    before, _ = run_node(image, kl_small, steps=6, method=method)
    monkeypatch.setattr(kl_small, "process_output", lambda image: image.add_(1.0).div_(2.0).clamp_(0.0, 1.0))
    after, _ = run_node(image, kl_small, steps=6, method=method)
    assert torch.equal(after["samples"], before["samples"])


def test_a_model_the_host_will_not_let_us_copy_is_an_error_naming_precision(adapter, taef2, run_node, photos64,
                                                                            monkeypatch):
    """A precision other than the VAE's own runs on a private copy of its model; where the host's model cannot be
    copied (newer ComfyUI's dynamic VRAM may page its weights: docs/compat.md, not verified), the error names the
    input and the setting that needs no copy, instead of a bare deepcopy traceback."""
    def refuse(self, memo):
        raise RuntimeError("Only Tensors created explicitly by the user support the deepcopy protocol")

    monkeypatch.setattr(type(taef2.first_stage_model), "__deepcopy__", refuse, raising=False)
    other = "bf16" if taef2.vae_dtype != torch.bfloat16 else "fp32"
    with pytest.raises(adapter.UnsupportedVAE, match=f"precision: running this VAE in {other} needs a copy"):
        adapter.vae_codec(taef2, other)
    codec = adapter.vae_codec(taef2, "auto")  # the VAE as loaded: no copy
    with pytest.raises(adapter.UnsupportedVAE, match="gradient steps needs a copy of its model"):
        codec.differentiable_decode()
    latent, summary = run_node(photos64["astronaut"][:, :32, :32], taef2, steps=8)  # the default: its rival skipped
    assert "diis rival not run: no differentiable decoder here (UnsupportedVAE: gradient steps needs a copy" in summary
    assert torch.isfinite(latent["samples"]).all()
