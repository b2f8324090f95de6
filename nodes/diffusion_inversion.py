"""Diffusion Inversion: from a latent back to the initial noise of a deterministic Euler/DDIM run.

ComfyUI computes the denoiser (CFG, conditioning, model patches, eps/v/flow conversions) through
its own CFGGuider; this node hands it a sampler object whose `sample` runs core.invert_euler
instead of a forward sampler, then divides out the initial noise scaling of the model's own
model_sampling (`noise_scaling`).
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.utils
from comfy_api.latest import io, ui

from ..core import INVERSION_MODES, invert_euler
from .inputs import check_choice, latent_samples

KIND_NAMES = {"eps": "eps-prediction (SD1.x, SD2 base, SDXL)", "v": "v-prediction (SD2 768-v, zsnr models)",
              "flow": "flow (SD3, FLUX, rectified-flow models)"}


# Sampling types whose noise_scaling is not the eps/v/flow one the inversion divides out. Newer
# ComfyUI adds IMG_TO_IMG_FLOW / IMG_TO_IMG_VELOCITY: subclasses of CONST that ignore the noise
# (docs/compat.md); looked up by name because 0.3.75 lacks them.
UNSUPPORTED_SAMPLING = ("EDM", "X0", "COSMOS_RFLOW", "IMG_TO_IMG_FLOW", "IMG_TO_IMG_VELOCITY")


def model_kind(model) -> str:
    """eps / v / flow from the model's own model_sampling class, or a clear error."""
    ms = model.get_model_object("model_sampling")
    ms_cls = type(ms)
    unsupported = [c for c in (getattr(comfy.model_sampling, name, None) for name in UNSUPPORTED_SAMPLING)
                   if c is not None and isinstance(ms, c)]
    if unsupported or not isinstance(ms, (comfy.model_sampling.EPS, comfy.model_sampling.CONST)):
        what = unsupported[0].__name__ if unsupported else ms_cls.__name__
        raise ValueError(
            f"model: its sampling type ({what}) is not supported; Diffusion Inversion handles "
            f"{', '.join(KIND_NAMES.values())}. Use a model of one of these types, or remove the patch "
            "(e.g. a ModelSampling* node) that changed its sampling type.")
    if isinstance(ms, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(ms, comfy.model_sampling.V_PREDICTION):
        return "v"
    return "eps"


class _InversionSampler(comfy.samplers.Sampler):
    """Called by CFGGuider.sample like any sampler: gets the CFG denoiser and the latent already
    converted to the model's space (process_latent_in), runs the inversion, keeps the noise."""

    def __init__(self, mode: str, iterations: int, tolerance: float, progress):
        self.mode, self.iterations, self.tolerance, self.progress = mode, iterations, tolerance, progress
        self.noise = None
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        def denoise(x, sigma):
            comfy.model_management.throw_exception_if_processing_interrupted()
            return model_wrap(x, sigma, **extra_args).to(x.dtype)

        def on_step(done, total, stats):
            self.progress.update_absolute(done, total)

        x = latent_image.to(torch.float32)
        self.result = invert_euler(denoise, x, sigmas, mode=self.mode, iterations=self.iterations,
                                   tolerance=self.tolerance, callback=on_step)
        ms = model_wrap.inner_model.model_sampling
        # Text-to-image start: state = noise_scaling(sigma_0, noise, empty latent). Divide it out.
        ones = torch.ones_like(x[:1])
        scale = ms.noise_scaling(sigmas[0], ones, torch.zeros_like(ones), self.max_denoise(model_wrap, sigmas))
        self.noise = self.result.x / scale
        return latent_image


class DiffusionInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExactEncodeDiffusionInversion",
            display_name="Diffusion Inversion (Euler/DDIM)",
            category="latent/inversion",
            description=(
                "Runs the deterministic Euler/DDIM sampler backwards: from a latent (e.g. VAE Exact Encode of a "
                "generated image) to the initial Gaussian noise it was sampled from, with the same model, "
                "conditioning, cfg and schedule. naive = DDIM inversion (one model call per step); exact = "
                "each backward step refined by fixed-point iteration until its forward step lands on the "
                "latent (backward Euler, Hong et al. CVPR 2024). eps-, v-prediction and flow models are told "
                "apart by the model itself. Use it to read noise-space watermarks such as Tree-Ring."),
            inputs=[
                io.Model.Input("model", tooltip="The model the image was generated with (same patches and LoRAs)."),
                io.Conditioning.Input("positive", tooltip="The positive conditioning of the generation (an empty "
                                                          "prompt works too when it is unknown, with cfg 1)."),
                io.Conditioning.Input("negative", tooltip="The negative conditioning of the generation."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of the inversion. The generation's cfg "
                                       "reproduces it best; Tree-Ring's authors invert with cfg 1 and an empty "
                                       "prompt when the prompt is unknown."),
                io.Int.Input("steps", default=50, min=1, max=10000,
                             tooltip="Sampler steps (ignored when sigmas is connected)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="normal",
                               tooltip="Noise schedule, as in KSampler / BasicScheduler (ignored when sigmas is "
                                       "connected)."),
                io.Latent.Input("latent", tooltip="The latent to invert, in the VAE's units (VAE Encode / VAE "
                                                  "Exact Encode output, or a sampler's output)."),
                io.Combo.Input("mode", options=list(INVERSION_MODES), default="exact",
                               tooltip="naive: DDIM inversion, one model call per step. exact: each step solved by "
                                       "fixed-point iteration (up to 1 + iterations calls per step), so running "
                                       "the sampler forward from the result lands back on the latent."),
                io.Int.Input("iterations", default=10, min=1, max=1000, optional=True,
                             tooltip="(advanced, exact mode) Fixed-point refinements per step at most; the "
                                     "iterate whose forward step lands closest is kept."),
                io.Float.Input("tolerance", default=1e-4, min=0.0, max=1.0, step=1e-5, optional=True,
                               tooltip="(advanced, exact mode) Stop refining a step once its forward step lands "
                                       "within this relative distance of the latent. 0 = always run all iterations."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="(optional) The exact schedule of the generation (e.g. from BasicScheduler); "
                                        "overrides steps and scheduler."),
            ],
            outputs=[
                io.Latent.Output(display_name="noise",
                                 tooltip="The recovered initial noise (unit variance for a text-to-image run), "
                                         "same shape as the latent."),
                io.String.Output(display_name="summary",
                                 tooltip="Model type, mode, steps, model evaluations and the worst step residual."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, steps, scheduler, latent, mode, iterations=10,
                tolerance=1e-4, sigmas=None) -> io.NodeOutput:
        # mode, iterations and tolerance: core.invert_euler checks them, naming the input
        check_choice("scheduler", scheduler, comfy.samplers.SCHEDULER_NAMES)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: must be >= 1 (the number of sampler steps of the generation); got {steps!r}")
        if not cfg >= 0:
            raise ValueError(f"cfg: must be >= 0; got {cfg}")
        samples = latent_samples(latent, "latent", finite=True)
        kind = model_kind(model)
        expected = getattr(model.get_model_object("latent_format"), "latent_channels", samples.shape[1])
        if samples.shape[1] != expected:
            raise ValueError(f"latent: has {samples.shape[1]} channels but this model works on {expected}; encode "
                             "the image with the VAE that belongs to this model.")
        ms = model.get_model_object("model_sampling")
        if sigmas is None:
            sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps)
        else:
            if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
                raise ValueError("sigmas: need at least 2 noise levels (1 step); connect a scheduler with steps >= 1.")
        sigmas = sigmas.float()  # a schedule that stops above 0 is allowed: the latent is then that state
        n_steps = int(sigmas.numel()) - 1
        progress = comfy.utils.ProgressBar(n_steps)
        sampler = _InversionSampler(mode, iterations, tolerance, progress)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        x = samples.to(torch.float32)
        guider.sample(torch.zeros_like(x), x, sampler, sigmas, disable_pbar=True, seed=0)
        noise = sampler.noise.to(comfy.model_management.intermediate_device(), torch.float32)
        summary = (f"{kind} model, {sampler.result.summary()}, sigma {float(sigmas[0]):.4g} -> "
                   f"{float(sigmas[-1]):.4g}; recovered noise std {float(noise.std()):.4f}")
        out = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask")}
        out["samples"] = noise
        return io.NodeOutput(out, summary, ui=ui.PreviewText(summary))
