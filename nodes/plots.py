"""Diagnostics figures as IMAGE tensors, drawn with matplotlib's Agg backend (no display, no pyplot
global state, so it is safe in ComfyUI's worker thread). No ComfyUI import: usable on its own."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SIZE = (768, 512)  # px; ComfyUI's preview shows it whole at the default node size
DPI = 100


def _render(fig: Figure) -> torch.Tensor:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba(), dtype=np.float32)
    return torch.from_numpy(rgba[..., :3] / 255.0)  # (H, W, 3), as ComfyUI's IMAGE rows


def _figure(size=SIZE) -> Figure:
    return Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")


def _finite(values: Sequence[Optional[float]]) -> tuple[list[int], list[float]]:
    pts = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    return [i for i, _ in pts], [v for _, v in pts]


def convergence_plot(title: str, psnr: Optional[Sequence[Optional[float]]],
                     residual_db: Optional[Sequence[Optional[float]]], psnr_encoder: Optional[float],
                     psnr_final: Optional[float], best_iteration: Optional[int] = None) -> torch.Tensor:
    """PSNR of D(z_k) vs x (left axis) and residual ||E(D(z_k)) - E(x)|| / ||E(x)|| in dB (right
    axis) against iteration k, with the plain encoder's PSNR as a dashed line. Without a trace
    (a latent from another node) it shows the two PSNR levels and says why there is no curve."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("iteration")
    ax.set_ylabel("PSNR of D(z) vs image (dB)", color="tab:blue")
    ax.grid(alpha=0.3)
    handles = []
    if psnr:
        ks, vs = _finite(psnr)
        handles += ax.plot(ks, vs, color="tab:blue", lw=1.8, label="PSNR D(z_k)")
        if best_iteration is not None and best_iteration < len(psnr) and psnr[best_iteration] is not None:
            handles += ax.plot([best_iteration], [psnr[best_iteration]], "o", color="tab:blue",
                               label=f"returned: iteration {best_iteration}")
    else:
        ax.text(0.5, 0.85, "no solver trace on this latent\n(not from VAE Exact Encode, or changed since)",
                transform=ax.transAxes, ha="center", va="center", color="0.35")
        if psnr_final is not None and math.isfinite(psnr_final):
            handles.append(ax.axhline(psnr_final, color="tab:blue", lw=1.8, label=f"this latent {psnr_final:.2f} dB"))
    if psnr_encoder is not None and math.isfinite(psnr_encoder):
        handles.append(ax.axhline(psnr_encoder, color="0.3", ls="--", lw=1.2,
                                  label=f"plain encoder {psnr_encoder:.2f} dB"))
    if residual_db:
        ks, vs = _finite(residual_db)
        if ks:
            ax2 = ax.twinx()
            ax2.set_ylabel("latent residual (dB)", color="tab:red")
            handles += ax2.plot(ks, vs, color="tab:red", lw=1.2, alpha=0.8, label="residual")
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=9, framealpha=0.85)
    return _render(fig)


def error_map_plot(title: str, error_encoder: Optional[torch.Tensor], error_latent: torch.Tensor,
                   psnr_encoder: Optional[float], psnr_latent: float) -> torch.Tensor:
    """|D(E(x)) - x| beside |D(z) - x| (mean over RGB) on one shared colour scale with a colour bar.
    The scale tops out at the 99.5th percentile of both maps so one outlier pixel cannot hide
    the rest; brighter pixels are marked by the bar's arrow ("extend=max"), not dropped."""
    maps = [m for m in (error_encoder, error_latent) if m is not None]
    vmax = float(torch.quantile(torch.cat([m.flatten().float() for m in maps]), 0.995))
    vmax = vmax if vmax > 0 else 1e-6
    fig = _figure()
    fig.suptitle(title, fontsize=11)
    panels = ([("|D(E(x)) - x|, plain encoder", error_encoder, psnr_encoder)] if error_encoder is not None else [])
    panels.append(("|D(z) - x|, this latent", error_latent, psnr_latent))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    im = None
    for ax, (name, m, psnr) in zip(axes, panels):
        im = ax.imshow(m.float().numpy(), cmap="inferno", vmin=0.0, vmax=vmax, interpolation="nearest")
        label = f"{psnr:.2f} dB" if psnr is not None and math.isfinite(psnr) else "exact"
        ax.set_title(f"{name}\nPSNR {label}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.8, extend="max", label="absolute error (0-1 scale)")
    return _render(fig)


def drift_plot(title: str, psnr: dict[str, Sequence[float]], colors: Optional[dict[str, str]] = None) -> torch.Tensor:
    """PSNR against the original per generation (1..G), one line per chain (e.g. stock VAE Encode vs
    VAE Exact Encode), each labelled with its last value. +inf (a bit-exact chain) is drawn at the
    top edge of the plot and labelled "exact"."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("generation (encode -> decode passes)")
    ax.set_ylabel("PSNR vs original (dB)")
    ax.grid(alpha=0.3)
    finite = [v for vs in psnr.values() for v in vs if v is not None and math.isfinite(v)]
    top = (max(finite) + 3.0) if finite else 60.0
    palette = iter(["tab:red", "tab:blue", "tab:green", "tab:purple"])
    for name, values in psnr.items():
        gens = list(range(1, len(values) + 1))
        ys = [top if (v is not None and v == math.inf) else v for v in values]
        last = values[-1]
        label = f"{name}: {'exact' if last == math.inf else f'{last:.2f} dB'} after {len(values)}"
        ax.plot(gens, ys, "o-", lw=1.8, color=(colors or {}).get(name) or next(palette), label=label)
    if psnr:
        ax.set_xticks(list(range(1, max(len(v) for v in psnr.values()) + 1)))
        ax.legend(loc="best", fontsize=9, framealpha=0.85)
    return _render(fig)
