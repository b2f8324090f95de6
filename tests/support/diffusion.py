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
