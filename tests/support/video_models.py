"""Seeded random video VAEs that ComfyUI 0.3.75 loads, built as a checkpoint would be: ComfyUI's own
model class is instantiated, its parameters are replaced by seeded random tensors, and the state
dict goes through `comfy.sd.VAE(sd=...)`, so ComfyUI's key-based detection picks the architecture.
Where sd.py fixes the width (everything but Wan 2.1 and LTX-Video) the model is full size.
Random weights: shapes, layouts and plumbing only, never quality."""
from __future__ import annotations

import json
import math
from contextlib import contextmanager

import torch


def random_state_dict(model: torch.nn.Module, seed: int) -> dict:
    """Parameters: fan-in-scaled normals for weights, ones for norm scales, zeros for biases (as
    models.seeded_weights). Buffers (wavelet filters, statistics) keep the model's own values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    buffers = dict(model.named_buffers())
    for k, v in model.state_dict().items():
        if k in buffers:
            out[k] = v.detach().clone()
        elif v.ndim > 1 and not k.endswith("gamma"):
            out[k] = torch.randn(v.shape, generator=g) / math.sqrt(v[0].numel())
        elif "norm" in k or k.endswith("gamma") or k.endswith("scale"):
            out[k] = torch.ones(v.shape)
        else:
            out[k] = torch.zeros(v.shape)
    return out


@contextmanager
def narrowed(module, name: str, **widths):
    """While active, `module.name` (the class sd.py instantiates for a detected VAE) is a subclass
    of it whose constructor overrides the width arguments: sd.py's own detection then builds
    ComfyUI's own architecture at a width a CPU test can afford, from a state dict of that width.
    Used only where sd.py hard-codes a full-size width that costs > 4 GB or > 30 s on CPU."""
    base = getattr(module, name)
    narrow = type(base.__name__, (base,),
                  {"__init__": lambda self, *a, **kw: base.__init__(self, *a, **{**kw, **widths}),
                   "__module__": base.__module__})
    setattr(module, name, narrow)
    try:
        yield narrow
    finally:
        setattr(module, name, base)


def _vae(sd, metadata=None):
    import comfy.sd

    return comfy.sd.VAE(sd=sd, metadata=metadata)


def wan22(seed=0):
    """Wan 2.2 (TI2V-5B) VAE: 48 channels, 16 px cells, 4x in time. sd.py fixes dim 160."""
    from comfy.ldm.wan.vae2_2 import WanVAE

    model = WanVAE(dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True])
    return _vae(random_state_dict(model, seed))


def hunyuan_video(seed=0):
    """Hunyuan Video VAE: a 3-D KL autoencoder (conv3d, 16 channels, 8 px cells, 4x in time)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
                "conv3d": True, "time_compress": 4}
    return _vae(random_state_dict(AutoencoderKL(ddconfig=ddconfig, embed_dim=16), seed))


def hunyuan_video15(seed=0):
    """Hunyuan Video 1.5 VAE: 32 channels, 16 px cells, 4x in time (sd.py's fixed widths up to 1024)."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"block_out_channels": [128, 256, 512, 1024, 1024], "in_channels": 3, "out_channels": 3,
                "num_res_blocks": 2, "ffactor_spatial": 16, "ffactor_temporal": 4, "downsample_match_channel": True,
                "upsample_match_channel": True, "z_channels": 32}
    model = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.EmptyRegularizer"},
        encoder_config={"target": "comfy.ldm.hunyuan_video.vae_refiner.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.hunyuan_video.vae_refiner.Decoder", "params": ddconfig})
    return _vae(random_state_dict(model, seed))


# LTX-Video reads its config from the checkpoint's metadata when there is one: the layout of version
# 0 (0.9.0, deterministic decoder: no timestep noise) with one block per stage, so 128 channels,
# 32 px cells (patch 4 x three 2x compressions) and 8x in time, as sd.py assumes, at a fraction of the size.
LTXV_SMALL = {"dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128,
              "blocks": [["res_x", 1], ["compress_all", 1], ["res_x", 1], ["compress_all", 1], ["res_x", 1],
                         ["compress_all", 1], ["res_x", 1]],
              "norm_layer": "pixel_norm", "patch_size": 4, "latent_log_var": "uniform", "causal_decoder": False}


def ltxv(seed=0, config=None):
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    config = LTXV_SMALL if config is None else config
    sd = random_state_dict(VideoVAE(config=config), seed)
    for k in sd:  # per-channel latent statistics: torch.empty in the class; a checkpoint has real ones
        if k.startswith("per_channel_statistics."):
            sd[k] = torch.ones(sd[k].shape) if "std" in k else torch.zeros(sd[k].shape)
    return _vae(sd, metadata={"config": json.dumps({"vae": config})})


def mochi(seed=0):
    """Genmo Mochi VAE: 12 channels, 8 px cells, 6x in time (sd.py's fixed full-size config)."""
    from comfy.ldm.genmo.vae.model import VideoVAE

    return _vae(random_state_dict(VideoVAE(), seed))


def cosmos(seed=0):
    """Cosmos-1.0 continuous video tokenizer (CV8x8x8): 16 channels, 8 px cells, 8x in time."""
    from comfy.ldm.cosmos.vae import CausalContinuousVideoTokenizer

    ddconfig = {"z_channels": 16, "latent_channels": 16, "z_factor": 1, "resolution": 1024, "in_channels": 3,
                "out_channels": 3, "channels": 128, "channels_mult": [2, 4, 4], "num_res_blocks": 2,
                "attn_resolutions": [32], "dropout": 0.0, "patch_size": 4, "num_groups": 1,
                "temporal_compression": 8, "spacial_compression": 8}
    model = CausalContinuousVideoTokenizer(**ddconfig)
    sd = random_state_dict(model, seed)
    sd["latent_mean"], sd["latent_std"] = torch.zeros_like(sd["latent_mean"]), torch.ones_like(sd["latent_std"])
    # the wavelet filter is a non-persistent buffer, but Cosmos checkpoints carry it and sd.py detects by it
    sd["decoder.unpatcher3d.wavelets"] = model.decoder.unpatcher3d.wavelets.clone()
    return _vae(sd)


def taew22(seed=0):
    """TAEHV-family tiny autoencoder for Wan 2.2 (taew2_2): 48 channels, 16 px cells, 4x in time."""
    from comfy.taesd.taehv import TAEHV

    return _vae(random_state_dict(TAEHV(latent_channels=48), seed))


BUILDERS = {"wan22": wan22, "hunyuan_video": hunyuan_video, "hunyuan_video15": hunyuan_video15, "ltxv": ltxv,
            "mochi": mochi, "cosmos": cosmos, "taew22": taew22}


def wan22_narrow(seed=0, dim=16, dec_dim=32):
    """Wan 2.2 VAE through sd.py's detection with encoder/decoder widths `dim`/`dec_dim` instead of
    160/256 (full size: 705M parameters, 5.9 GB peak and 17 s to build on CPU, measured)."""
    import comfy.ldm.wan.vae2_2 as wan22_mod

    with narrowed(wan22_mod, "WanVAE", dim=dim, dec_dim=dec_dim) as cls:
        model = cls(z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[False, True, True])
        return _vae(random_state_dict(model, seed))


def hunyuan_video15_narrow(seed=0, widths=(16, 32, 64, 128, 128)):
    """Hunyuan Video 1.5 VAE through sd.py's detection with block widths `widths` instead of
    128..1024 (full size: 1261M parameters, 10 GB peak and 33 s to build on CPU, measured)."""
    import comfy.ldm.hunyuan_video.vae_refiner as hv15

    with narrowed(hv15, "Encoder", block_out_channels=list(widths)), \
            narrowed(hv15, "Decoder", block_out_channels=list(widths)):  # reversed inside
        return hunyuan_video15(seed)


BUILDERS.update(wan22_narrow=wan22_narrow, hunyuan_video15_narrow=hunyuan_video15_narrow)


def mochi_narrow(seed=0, encoder_base=32, decoder_base=32):
    """Mochi VAE through sd.py's detection with base widths 32/32 instead of 64/128 (GroupNorm needs 32) (full size:
    460M parameters, 4.1 GB peak and 12 s to build on CPU, measured)."""
    import comfy.ldm.genmo.vae.model as genmo

    with narrowed(genmo, "Encoder", base_channels=encoder_base), narrowed(genmo, "Decoder", base_channels=decoder_base):
        return mochi(seed)


BUILDERS.update(mochi_narrow=mochi_narrow)


def hunyuan_image_refiner_narrow(seed=0, widths=(32, 32, 64, 128, 128)):
    """Hunyuan Image 2.1 refiner VAE: a 3-D VAE that sd.py marks `not_video` (each image is a one-frame
    clip), 32 channels, 16 px cells; block widths `widths` instead of 128..1024 (sd.py's)."""
    import comfy.ldm.hunyuan_video.vae_refiner as hv15
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"block_out_channels": [128, 256, 512, 1024, 1024], "in_channels": 3, "out_channels": 3,
                "num_res_blocks": 2, "ffactor_spatial": 16, "ffactor_temporal": 4, "downsample_match_channel": True,
                "upsample_match_channel": True, "refiner_vae": False, "z_channels": 32}
    with narrowed(hv15, "Encoder", block_out_channels=list(widths)), \
            narrowed(hv15, "Decoder", block_out_channels=list(widths)):
        model = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.hunyuan_video.vae_refiner.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.hunyuan_video.vae_refiner.Decoder", "params": ddconfig})
        return _vae(random_state_dict(model, seed))


BUILDERS.update(hunyuan_image_refiner_narrow=hunyuan_image_refiner_narrow)
