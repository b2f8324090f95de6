"""Inversion Diagnostics: did exact encoding help, by how much, and does the paper's assumption hold?"""
from __future__ import annotations

import json
import math

import torch

from comfy_api.latest import io, ui

from ..core.diagnostics import reconstruction
from . import plots, trace
from .adapter import check_supported, latent_cell, vae_codec
from .inputs import image_to_pixels, latent_samples


def _db(v) -> str:
    if v is None:
        return "n/a"
    return "exact (inf)" if math.isinf(v) else f"{v:.2f} dB"


def check_shapes(image: torch.Tensor, latent: torch.Tensor, reference, vae) -> None:
    """Clear errors naming both shapes when the inputs do not belong together."""
    if latent.ndim != 4:
        raise ValueError(f"latent: expected an image latent (B, C, h, w); got shape {tuple(latent.shape)}")
    if image.shape[0] != latent.shape[0]:
        raise ValueError(f"latent: batch of {latent.shape[0]} but image: batch of {image.shape[0]}; connect "
                         "the image batch this latent was encoded from (same number of images).")
    cell = latent_cell(vae)
    expected = (image.shape[0], vae.latent_channels, image.shape[2] // cell, image.shape[3] // cell)
    if tuple(latent.shape) != expected:
        raise ValueError(
            f"latent: shape {tuple(latent.shape)} does not match this VAE and image: the VAE encodes the "
            f"{image.shape[3]}x{image.shape[2]} px image (after cropping to {cell} px cells) to {expected}. "
            "Connect the latent encoded from this image with this VAE.")
    if reference is not None and tuple(reference.shape) != tuple(latent.shape):
        raise ValueError(f"reference: shape {tuple(reference.shape)} differs from latent: {tuple(latent.shape)}; "
                         "the reference must be a latent of the same image(s) and VAE.")


def report_lines(i: int, m: dict, solver: dict | None, coco: dict | None) -> list[str]:
    lines = [f"image {i + 1}: PSNR of D(z) {_db(m['psnr'])}"
             + (f" vs plain encoder {_db(m['psnr_encoder'])}: gain {m['gain_db']:+.2f} dB"
                if "psnr_encoder" in m and math.isfinite(m.get("gain_db", math.nan)) else "")]
    err = f"  max |D(z) - x| {m['max_abs_error']:.4f}"
    if "max_abs_error_encoder" in m:
        err += f" (encoder {m['max_abs_error_encoder']:.4f})"
    res = f"; latent residual {_db(m['residual_db'])}"
    if "residual_db_encoder" in m:
        res += f" (encoder {_db(m['residual_db_encoder'])})"
    lines.append(err + res)
    if "nmse_db_reference" in m:
        enc = f" (encoder {_db(m['nmse_db_reference_encoder'])})" if "nmse_db_reference_encoder" in m else ""
        lines.append(f"  NMSE vs reference latent {_db(m['nmse_db_reference'])}{enc}")
    if solver is not None and solver.get("other_image"):
        lines.append("  solver: the trace on this latent belongs to another image (it was encoded from a "
                     "different image than the one connected); connect the image this latent was encoded from")
    elif solver is not None:
        lines.append(f"  solver: {solver['method']}, {solver['iterations']} iterations, best at "
                     f"{solver['best_iteration']}, stop: {solver['stop_reason']}, {solver['seconds']:.2f} s")
    else:
        lines.append("  solver: no trace (latent not from VAE Exact Encode, or changed since)")
    if coco and coco.get("points"):
        holds = "holds" if coco["share_positive"] == 1.0 else (
            "mostly holds" if coco["share_positive"] >= 0.9 else "does NOT hold")
        lines.append(f"  assumption (cocoercivity of E(D(z)) - E(x)): {holds}: beta >= {coco['beta_min']:.3g} "
                     f"on {coco['share_positive'] * 100:.0f}% of {coco['points']} steps with beta > 0 "
                     f"(median beta {coco['beta_median']:.3g})")
    elif solver is not None and not solver.get("other_image"):
        lines.append("  assumption: not checked (VAE Exact Encode ran with check_assumption off)")
    return lines


class InversionDiagnostics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExactEncodeInversionDiagnostics",
            display_name="Inversion Diagnostics",
            category="latent/inversion",
            is_output_node=True,  # its report is the point: it runs even with nothing downstream
            description=(
                "Measures how well a latent reproduces an image through this VAE's decoder, against the "
                "plain encoder: PSNR and gain, max error, latent residual, NMSE against a reference latent, "
                "the solver's convergence trace (latents from VAE Exact Encode) and whether the paper's "
                "convergence assumption (cocoercivity) held along it. Plots and error maps as images."),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE the latent belongs to (its decoder is what is measured)."),
                io.Image.Input("image", tooltip="The target image x, the one the latent was encoded from."),
                io.Latent.Input("latent", tooltip="Any LATENT of the image: from VAE Exact Encode (carries "
                                                  "its trace) or from stock VAE Encode."),
                io.Boolean.Input("compare_encoder", default=True,
                                 tooltip="Also encode the image with the plain encoder and report the gain "
                                         "over it (one more encode and decode)."),
                io.Latent.Input("reference", optional=True,
                                tooltip="(optional) Ground-truth latent, e.g. the one that generated the "
                                        "image: adds the paper's NMSE (dB) against it."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="Human-readable, one block per image."),
                io.String.Output(display_name="json", tooltip="The same numbers and the trace, as JSON."),
                io.Image.Output(display_name="convergence",
                                tooltip="PSNR and latent residual per iteration, plain encoder as a line."),
                io.Image.Output(display_name="error_map",
                                tooltip="|D(E(x)) - x| beside |D(z) - x| on one colour scale."),
            ],
        )

    @classmethod
    def execute(cls, vae, image, latent, compare_encoder=True, reference=None) -> io.NodeOutput:
        check_supported(vae)
        samples = latent_samples(latent, "latent", ndim=None)
        ref = None if reference is None else latent_samples(reference, "reference", ndim=None)
        pixels = image_to_pixels(image, vae, input_name="image")
        check_shapes(pixels, samples, ref, vae)
        if not torch.isfinite(samples).all():
            raise ValueError("latent: contains NaN or Inf values; the node that produced it failed.")

        payload = trace.read(samples)
        if payload is not None and payload.get("kind", "inversion") != "inversion":
            payload = None  # image latents only come from the whole-image solver; nothing else to show
        other_image = payload is not None and not trace.same_image(payload, pixels)
        if other_image:
            lines_head = ["WARNING: the latent was encoded from another image than the one connected; the "
                          "numbers below measure it against this image, and its solver trace is not shown."]
        else:
            lines_head = []
        codec = vae_codec(vae, "auto", tuple(pixels.shape))
        rec = reconstruction(codec, pixels, samples, reference=ref, baseline=compare_encoder)

        lines = [f"Inversion Diagnostics: {len(rec['samples'])} image(s), "
                 f"{type(vae.first_stage_model).__name__}, latent {tuple(samples.shape[1:])}"] + lines_head
        images, convergence, maps = [], [], []
        for i, m in enumerate(rec["samples"]):
            solver = coco = None
            psnr_trace = res_trace = None
            if other_image:
                solver = {"other_image": True}
            elif payload is not None:
                s = payload["samples"][i]
                solver = dict(method=payload["method"], dtype=payload["dtype"], seconds=payload["seconds"],
                              iterations=s["iterations"], best_iteration=s["best_iteration"],
                              stop_reason=s["stop_reason"], psnr_best=s["psnr_best"])
                coco = s.get("cocoercivity")
                psnr_trace = payload["trace"]["psnr"][i][: s["iterations"] + 1]
                res_trace = payload["trace"]["residual_db"][i][: s["iterations"] + 1]
                solver["trace"] = {"psnr": psnr_trace, "residual_db": res_trace}
            lines += report_lines(i, m, solver, coco)
            images.append(dict(m, solver=solver, cocoercivity=coco))
            convergence.append(plots.convergence_plot(
                f"image {i + 1}: " + (f"{solver['method']}, best at iteration {solver['best_iteration']}"
                                      if solver and not other_image else "latent without a solver trace"),
                psnr_trace, res_trace, m.get("psnr_encoder"), m["psnr"],
                solver["best_iteration"] if solver and not other_image else None))
            maps.append(plots.error_map_plot(
                f"image {i + 1}: absolute error of the decode", rec["error_map_encoder"][i]
                if rec["error_map_encoder"] is not None else None, rec["error_map"][i],
                m.get("psnr_encoder"), m["psnr"]))
        report = "\n".join(lines)
        data = json.dumps(_json_safe({
            "vae": type(vae.first_stage_model).__name__, "latent_shape": list(samples.shape),
            "compare_encoder": bool(compare_encoder), "has_trace": payload is not None and not other_image,
            "trace_of_another_image": other_image, "images": images}),
            indent=1)
        return io.NodeOutput(report, data, torch.stack(convergence), torch.stack(maps),
                             ui=ui.PreviewText(report))


def _json_safe(v):
    """Strict JSON: +-inf (an exact reconstruction) and NaN become strings / null."""
    if isinstance(v, float):
        return None if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v
