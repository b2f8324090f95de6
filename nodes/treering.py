"""Tree-Ring watermark nodes: make a key, watermark a sampler's initial noise, detect in inverted noise."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.sample
from comfy_api.latest import io, ui

from ..core import PATTERNS, SIGMA_ESTIMATORS, TreeRingKey, WatermarkKeyError, detect, inject, spectrum_image
from .inputs import check_choice, latent_samples

WatermarkKey = io.Custom("WATERMARK_KEY")


def _clean(e: Exception) -> ValueError:
    return ValueError(str(e))


class TreeRingKeyNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExactEncodeTreeRingKey",
            display_name="Tree-Ring Key",
            category="latent/watermark",
            description=(
                "Makes a Tree-Ring watermark key (Wen et al., NeurIPS 2023) for latents of the given latent's "
                "shape: a pattern written into the centred Fourier spectrum of the initial noise, inside a disc "
                "of `radius` frequency bins. The JSON output is all a checker needs later."),
            inputs=[
                io.Latent.Input("latent", tooltip="The (empty) latent the images will be sampled from: fixes the "
                                                  "key's channels x height x width. For SD3/FLUX use the 16-channel "
                                                  "EmptySD3LatentImage."),
                io.Combo.Input("pattern", options=list(PATTERNS), default="ring",
                               tooltip="ring: concentric rings of constant value (the paper's setting, robust). "
                                       "rand: a random Gaussian spectrum. zeros: all zero."),
                io.Int.Input("radius", default=10, min=1, max=512,
                             tooltip="Disc radius in frequency bins (the paper: 10 on 64x64 latents). Must be "
                                     "< half the latent's smaller side."),
                io.Int.Input("channel", default=3, min=-1, max=127,
                             tooltip="Latent channel that carries the key; -1 = all channels. The paper uses "
                                     "channel 3 of SD's 4."),
                io.Int.Input("key_seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Seed of the key's values (keep it secret: it is the key)."),
            ],
            outputs=[
                WatermarkKey.Output(display_name="key", tooltip="The key, for Tree-Ring Watermarked Noise and "
                                                                "Tree-Ring Detect."),
                io.String.Output(display_name="key_json", tooltip="The key as JSON (shape, pattern, radius, channel, "
                                                                  "seed and the key values): save it to check "
                                                                  "images later."),
            ],
        )

    @classmethod
    def execute(cls, latent, pattern, radius, channel, key_seed) -> io.NodeOutput:
        check_choice("pattern", pattern, PATTERNS)
        samples = latent_samples(latent)
        try:
            key = TreeRingKey(tuple(samples.shape[1:]), pattern, radius, channel, key_seed)
        except WatermarkKeyError as e:
            raise _clean(e) from None
        text = key.to_json()
        return io.NodeOutput(key, text)


class _WatermarkedNoise:
    """The NOISE protocol of SamplerCustomAdvanced (like ComfyUI's Noise_RandomNoise): the seed's
    Gaussian noise, with the key written into its spectrum."""

    def __init__(self, seed: int, key: TreeRingKey):
        self.seed = seed
        self.key = key

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        base = comfy.sample.prepare_noise(samples, self.seed, input_latent.get("batch_index"))
        try:
            return inject(base.float(), self.key).to(base.dtype)
        except WatermarkKeyError as e:
            raise ValueError(f"{e} (the sampler's latent must have the key's shape)") from None


class TreeRingWatermarkedNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExactEncodeTreeRingWatermarkedNoise",
            display_name="Tree-Ring Watermarked Noise",
            category="latent/watermark",
            description=(
                "A NOISE for SamplerCustomAdvanced: the seed's Gaussian noise (exactly what Random Noise gives) "
                "with the Tree-Ring key written into its Fourier spectrum. Sample with a deterministic sampler "
                "(euler or ddim) so Diffusion Inversion can read the key back."),
            inputs=[
                WatermarkKey.Input("key", tooltip="From Tree-Ring Key."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the Gaussian noise outside the key (as Random Noise)."),
                io.Latent.Input("latent", tooltip="The latent that will be sampled (its shape and batch); must "
                                                  "match the key's shape."),
            ],
            outputs=[
                io.Noise.Output(display_name="noise", tooltip="Connect to SamplerCustomAdvanced's noise."),
                io.Latent.Output(display_name="noise_latent",
                                 tooltip="The same watermarked noise as a LATENT, to inspect it or to check "
                                         "Tree-Ring Detect on it directly."),
            ],
        )

    @classmethod
    def execute(cls, key, noise_seed, latent) -> io.NodeOutput:
        if not isinstance(key, TreeRingKey):
            raise ValueError("key: not a Tree-Ring key; connect the key output of Tree-Ring Key.")
        samples = latent_samples(latent)
        noise = _WatermarkedNoise(noise_seed, key)
        try:
            key.check_latent(samples, "latent")
        except WatermarkKeyError as e:
            raise _clean(e) from None
        out = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask")}
        out["samples"] = noise.generate_noise(latent).to(comfy.model_management.intermediate_device(), torch.float32)
        return io.NodeOutput(noise, out)


class TreeRingDetect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExactEncodeTreeRingDetect",
            display_name="Tree-Ring Detect",
            category="latent/watermark",
            description=(
                "Tests an inverted noise (Diffusion Inversion output) for a Tree-Ring key: the p-value of the "
                "non-central chi-square test of the Tree-Ring authors (small = watermarked), the mean L1 distance "
                "to the key inside its disc, a verdict at the chosen false-positive rate and the noise's "
                "|FFT| with the key's disc outlined."),
            inputs=[
                io.Latent.Input("noise", tooltip="The recovered initial noise, from Diffusion Inversion."),
                WatermarkKey.Input("key", optional=True, tooltip="From Tree-Ring Key; or paste key_json instead."),
                io.String.Input("key_json", default="", multiline=True, optional=True,
                                tooltip="The key's JSON (Tree-Ring Key's key_json output), used when key is not "
                                        "connected."),
                io.Float.Input("fpr", default=0.01, min=1e-12, max=0.5, step=0.001, optional=True,
                               tooltip="False-positive rate of the verdict: watermarked when p < fpr."),
                io.Combo.Input("sigma", options=list(SIGMA_ESTIMATORS), default="outside", optional=True,
                               tooltip="(advanced) Noise level of the test. outside: estimated from the spectrum "
                                       "outside the key (calibrated p-values). prior: 1/sqrt(2), the value for "
                                       "unit Gaussian noise. mask: the Tree-Ring authors' estimate from the disc "
                                       "itself (conservative), for comparison with published numbers."),
            ],
            outputs=[
                io.Float.Output(display_name="p_value", tooltip="The largest p-value of the batch (the weakest "
                                                                "detection)."),
                io.Float.Output(display_name="l1_distance", tooltip="The largest mean |FFT - key| inside the disc "
                                                                    "of the batch (orthonormal FFT units)."),
                io.String.Output(display_name="verdict", tooltip="One line per image: verdict, p-value, L1 and the "
                                                                 "test's numbers."),
                io.Image.Output(display_name="spectrum", tooltip="log |FFT| of each latent channel, the key's disc "
                                                                 "outlined in red."),
            ],
        )

    @classmethod
    def execute(cls, noise, key=None, key_json="", fpr=0.01, sigma="outside") -> io.NodeOutput:
        samples = latent_samples(noise, "noise")
        try:
            if key is None:
                if not (key_json or "").strip():
                    raise WatermarkKeyError("key: no key; connect Tree-Ring Key's key output or paste its key_json.")
                key = TreeRingKey.from_json(key_json)
            elif not isinstance(key, TreeRingKey):
                raise WatermarkKeyError("key: not a Tree-Ring key; connect the key output of Tree-Ring Key.")
            key.check_latent(samples, "noise")
            results = detect(samples, key, fpr=fpr, sigma=sigma, name="noise")
            image = spectrum_image(samples, key)
        except WatermarkKeyError as e:
            raise _clean(e) from None
        lines = [f"image {i}: {r.verdict()}" for i, r in enumerate(results)]
        text = "\n".join(lines)
        p = max(r.p_value for r in results)
        l1 = max(r.l1 for r in results)
        return io.NodeOutput(p, l1, text, image.to(comfy.model_management.intermediate_device()),
                             ui=ui.PreviewText(text))
