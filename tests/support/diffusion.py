"""A seeded tiny random diffusion model built through ComfyUI's own classes, for the sampler-inversion
and watermark tests: an SD1.5-family UNet (`comfy.supported_models.SD15` config, shrunk: 32 base
channels, one res block per level, one cross-attention block at the lower level, context_dim 32,
4 latent channels) inside `comfy.model_base.BaseModel` and a `comfy.model_patcher.ModelPatcher`,
i.e. a MODEL exactly as a checkpoint loader returns it. Its model type picks ComfyUI's sampling
class: eps (EPS + ModelSamplingDiscrete), v (V_PREDICTION + ModelSamplingDiscrete) or flow (CONST +
ModelSamplingDiscreteFlow, shift 3 as SD3). Random weights: plumbing and inversion accuracy only,
never image quality. The output convolution is scaled down (`OUT_SCALE`) so the random network
is a mild denoiser (like a trained one, whose eps-prediction varies smoothly with its input).
"""
from __future__ import annotations

from pathlib import Path

import torch


KINDS = ("eps", "v", "flow")
CONTEXT_DIM = 32
TOKENS = 4
OUT_SCALE = 0.3

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1, "context_dim": CONTEXT_DIM,
    "use_spatial_transformer": True, "use_linear_in_transformer": True, "legacy": False,
    "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
    "num_head_channels": 16, "dtype": torch.float32,
}


def seeded_unet_weights(template: dict, seed: int) -> dict:
    """Fan-in-scaled normals for conv/linear weights, ones for every 1-D weight (in this UNet those
    are all GroupNorm/LayerNorm scales, whatever their key names), zeros for biases. ComfyUI's layers
    skip init (they expect a checkpoint), so every tensor is filled here."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in template.items():
        if v.ndim > 1:
            out[k] = torch.randn(v.shape, generator=g) / (v[0].numel() ** 0.5)
        elif k.endswith("weight"):
            out[k] = torch.ones(v.shape)
        else:
            out[k] = torch.zeros(v.shape)
    return out


def tiny_model(kind: str = "eps", seed: int = 0):
    """A ComfyUI MODEL (ModelPatcher) with seeded random weights; deterministic for a seed."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    config.unet_config["num_heads"] = -1  # SD15's extra config sets 8 heads; use 16-channel heads
    config.unet_config["num_head_channels"] = 16
    model_type = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION,
                  "flow": comfy.model_base.ModelType.FLOW}[kind]
    if kind == "flow":
        config.sampling_settings = {"shift": 3.0}
    with torch.inference_mode(False):
        model = comfy.model_base.BaseModel(config, model_type=model_type, device=torch.device("cpu"))
        weights = seeded_unet_weights(model.diffusion_model.state_dict(), seed)
        weights["out.2.weight"] = weights["out.2.weight"] * OUT_SCALE
        model.diffusion_model.load_state_dict(weights, strict=True)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_conditioning(seed: int = 0, batch: int = 1):
    """(positive, negative) in ComfyUI's CONDITIONING format: [[cross_attn (B, tokens, 32), {}]]."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(batch, TOKENS, CONTEXT_DIM, generator=g)
    neg = torch.randn(batch, TOKENS, CONTEXT_DIM, generator=g) * 0.5
    return [[pos, {}]], [[neg, {}]]


# ---- the trained tiny latent diffusion model (bench/train_ldm.py, tests/data/tiny_ldm/) ----------
# An SD1.x-family eps UNet of ComfyUI's own class, trained on kl_f8_small latents of CC0 /
# public-domain photos with a fixed empty (all-zero) conditioning: unconditional.
TRAINED_DIR = Path(__file__).resolve().parents[1] / "data" / "tiny_ldm"
TRAINED_WEIGHTS = TRAINED_DIR / "tiny_ldm.safetensors"
TRAINED_UNET_CONFIG = {
    **UNET_CONFIG, "model_channels": 64, "channel_mult": [1, 2, 2], "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 1, 1], "transformer_depth_output": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
    "num_head_channels": 32,
}


def trained_model_object(scale_factor: float, device=None):
    """ComfyUI's BaseModel (eps, SD15 sampling and latent format with the given scale factor) around
    an untrained copy of the trained UNet's architecture."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(TRAINED_UNET_CONFIG))
    config.unet_config["num_heads"] = -1
    config.unet_config["num_head_channels"] = TRAINED_UNET_CONFIG["num_head_channels"]
    config.latent_format = comfy.latent_formats.SD15(scale_factor=scale_factor)
    with torch.inference_mode(False):
        return comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS,
                                          device=device or torch.device("cpu"))


def trained_model(path: Path = TRAINED_WEIGHTS):
    """The trained tiny model as a ComfyUI MODEL (ModelPatcher), weights from `path` (fp16 on disk,
    fp32 in memory); the latent scale factor comes from the file's metadata."""
    import comfy.model_management
    import comfy.model_patcher
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"missing trained model weights {path}: they are committed test data "
                                "(tests/data/tiny_ldm/); rebuild them with `python -m bench.train_ldm`.")
    with safe_open(str(path), "pt") as f:
        scale_factor = float(f.metadata()["scale_factor"])
    model = trained_model_object(scale_factor)
    with torch.inference_mode(False):
        weights = {k: v.float() for k, v in load_file(str(path)).items()}
        model.diffusion_model.load_state_dict(weights, strict=True)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def empty_conditioning(batch: int = 1):
    """(positive, negative) for the trained model: its fixed empty conditioning (zeros)."""
    zeros = torch.zeros(batch, 1, CONTEXT_DIM)
    return [[zeros, {}]], [[zeros.clone(), {}]]
