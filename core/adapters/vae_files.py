"""VAE files and folders -> a diffusers model and its latent convention, with no ComfyUI and no hub.

Accepted (`load_vae(path)`):
- a diffusers folder (`config.json` with `_class_name` AutoencoderKL / AutoencoderTiny + weights);
- an LDM-format KL single file (ComfyUI's `models/vae`: SD 1.x/2.x, SDXL, SD3, FLUX.1 `ae.safetensors`;
  a whole checkpoint with a `first_stage_model.` prefix works too), its architecture read from the
  tensor shapes, or from a `config.json` beside it holding `params.ddconfig` (the shared kl_f8_small);
- the TAESD family (taesd, taesdxl, taesd3, taef1): a folder with `*_encoder.safetensors` and
  `*_decoder.safetensors` (madebyollin's keys `0.weight`, ...), or one file with ComfyUI's
  `taesd_encoder.` / `taesd_decoder.` prefixes. TAEF2 (GroupNorm blocks) has no diffusers class: refused.

The latent convention (see adapters.diffusers) comes from the diffusers config, or for single files
from `latent_format` ("auto" guesses from channels and file name: 16 channels need "flux" or "sd3"
in the name, else it asks).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# (scaling_factor, shift_factor) per latent family, as the diffusers pipelines set them.
LATENT_FORMATS = {"sd1": (0.18215, 0.0), "sdxl": (0.13025, 0.0), "sd3": (1.5305, 0.0609),
                  "flux": (0.3611, 0.1159), "raw": (1.0, 0.0)}
TAE_PREFIXES = ("taesd", "taesdxl", "taesd3", "taef1")


@dataclass
class LoadedVAE:
    model: torch.nn.Module  # diffusers AutoencoderKL or AutoencoderTiny, eval mode
    kind: str  # "kl" | "tiny"
    latent_format: str  # a LATENT_FORMATS key, or "config" (diffusers folder)
    files: list  # the weight files read, for hashing


def _read(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _ldm_config(sd: dict) -> dict:
    """diffusers AutoencoderKL config from an LDM state dict's shapes."""
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    width = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels]
    blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    return {"in_channels": sd["encoder.conv_in.weight"].shape[1],
            "out_channels": sd["decoder.conv_out.weight"].shape[0],
            "down_block_types": ["DownEncoderBlock2D"] * len(width),
            "up_block_types": ["UpDecoderBlock2D"] * len(width),
            "block_out_channels": width, "layers_per_block": blocks,
            "latent_channels": sd["decoder.conv_in.weight"].shape[1],
            "use_quant_conv": "quant_conv.weight" in sd, "use_post_quant_conv": "post_quant_conv.weight" in sd,
            "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd}


def _guess_format(path: Path, channels: int, latent_format: str) -> str:
    if latent_format != "auto":
        if latent_format not in LATENT_FORMATS:
            raise ValueError(f"latent format must be auto or one of {', '.join(LATENT_FORMATS)}; got {latent_format!r}")
        return latent_format
    name = path.name.lower()
    if channels == 4:
        return "sdxl" if "xl" in name else "sd1"
    if channels == 16:
        if "flux" in name or name == "ae.safetensors" or "taef1" in name:
            return "flux"
        if "sd3" in name:
            return "sd3"
        raise ValueError(f"{path}: a 16-channel VAE is FLUX.1's or SD3's; the file name does not say which. "
                         "Pass --latent-format flux or --latent-format sd3.")
    return "raw"


def _load_kl(sd: dict, path: Path, latent_format: str, config_file: Path | None) -> LoadedVAE:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    config = _ldm_config(sd)
    if config_file is not None:  # kl_f8_small style: {"params": {"ddconfig": ..., "embed_dim": ...}}
        dd = json.loads(config_file.read_text())["params"]["ddconfig"]
        config.update(block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
                      latent_channels=dd["z_channels"])
    fmt = "raw" if config_file is not None and latent_format == "auto" else _guess_format(
        path, config["latent_channels"], latent_format)
    scale, shift = LATENT_FORMATS[fmt]
    model = AutoencoderKL(**config, scaling_factor=scale, shift_factor=shift)
    converted = convert_ldm_vae_checkpoint(sd, {"down_block_types": config["down_block_types"],
                                                "up_block_types": config["up_block_types"]})
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not a KL VAE this converter understands (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return LoadedVAE(model.eval(), "kl", fmt, [path])


def _tae_model(encoder: dict, decoder: dict, path: Path, latent_format: str, files: list) -> LoadedVAE:
    from diffusers import AutoencoderTiny

    if any(".pool." in k for k in list(encoder) + list(decoder)):
        raise ValueError(f"{path}: a TAEF2-style tiny autoencoder (GroupNorm blocks); diffusers has no class for "
                         "it, so the command line cannot load it. In ComfyUI, VAE Exact Encode handles it.")
    channels = decoder["1.weight"].shape[1]
    fmt = _guess_format(path, channels, latent_format)
    model = AutoencoderTiny(latent_channels=channels)
    state = {f"encoder.layers.{k}": v for k, v in encoder.items()}
    # madebyollin's decoder starts with a parameter-free Clamp at index 0; diffusers' does not.
    for k, v in decoder.items():
        index, rest = k.split(".", 1)
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = v
    model.load_state_dict(state)
    return LoadedVAE(model.eval(), "tiny", fmt, files)


def _load_tae_folder(folder: Path, latent_format: str) -> LoadedVAE | None:
    enc = sorted(folder.glob("*_encoder.safetensors"))
    dec = sorted(folder.glob("*_decoder.safetensors"))
    if len(enc) != 1 or len(dec) != 1:
        return None
    return _tae_model(_read(enc[0]), _read(dec[0]), enc[0], latent_format, [enc[0], dec[0]])


def load_vae(path, latent_format: str = "auto") -> LoadedVAE:
    """Load a VAE for the command line; errors name the path and what was expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--vae: {path} does not exist")
    if path.is_dir():
        config_file = path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        if config.get("_class_name") in ("AutoencoderKL", "AutoencoderTiny"):
            import diffusers

            cls = getattr(diffusers, config["_class_name"])
            model = cls.from_pretrained(str(path), local_files_only=True)
            files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
            return LoadedVAE(model.eval(), "kl" if cls.__name__ == "AutoencoderKL" else "tiny", "config", files)
        tae = _load_tae_folder(path, latent_format)
        if tae is not None:
            return tae
        weights = sorted(path.glob("*.safetensors"))
        if len(weights) == 1:
            return _load_file(weights[0], latent_format, config_file if "params" in config else None)
        raise ValueError(f"--vae: {path} is neither a diffusers VAE folder (config.json with _class_name), "
                         "a TAESD encoder/decoder pair, nor a folder with one .safetensors file")
    sibling = path.parent / "config.json"
    has_ddconfig = sibling.exists() and "params" in json.loads(sibling.read_text())
    return _load_file(path, latent_format, sibling if has_ddconfig else None)


def _load_file(path: Path, latent_format: str, config_file: Path | None) -> LoadedVAE:
    if path.suffix != ".safetensors":
        raise ValueError(f"--vae: {path} is not a .safetensors file (pickled .ckpt/.pt files are not loaded: "
                         "convert them to safetensors first)")
    sd = _read(path)
    if "encoder.conv_in.weight" in sd or "first_stage_model.encoder.conv_in.weight" in sd:
        return _load_kl(sd, path, latent_format, config_file)
    for name in TAE_PREFIXES:
        enc = {k[len(name) + 9:]: v for k, v in sd.items() if k.startswith(f"{name}_encoder.")}
        dec = {k[len(name) + 9:]: v for k, v in sd.items() if k.startswith(f"{name}_decoder.")}
        if enc and dec:
            return _tae_model(enc, dec, path, latent_format, [path])
    raise ValueError(f"--vae: {path} holds no VAE this tool knows (expected LDM keys 'encoder.conv_in.weight' "
                     "or TAESD keys 'taesd_encoder.*' + 'taesd_decoder.*')")
