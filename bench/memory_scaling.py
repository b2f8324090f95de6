"""Peak memory against frames and megapixels (issue 7):

    .venv/bin/python -m bench.memory_scaling --frames 5 9 17 37 --pixel-sizes 256 512 1024 --wan-dim 16 --steps 1

Rows (each in a forked process of its own, peak = bench.memory.PeakMemory: CPU VmHWM over the RSS
before the row; CUDA max_memory_allocated):
- frames: a seeded random Wan 2.1 VAE (the real architecture, built by comfy.sd.VAE, width
  `--wan-dim`) on a 64 x 64 px clip of 1 + 4k frames; methods: gradient-free whole clip
  (VAE Exact Encode), gradient-free chunked in time (VAE Exact Encode (Tiled), 4-frame chunks with
  4 frames of context), gradient-based (whole clip).
- megapixels: TAEF2 on a photo resized to N x N px; gradient-free whole, gradient-free tiled
  (256 px tiles, 64 px overlap), gradient-based whole.
Every row runs `--steps` iterations (memory does not grow with steps). The summary gives, for
a memory cap equal to the gradient baseline's peak at `--cap-frames` frames, the most frames each
method handled under that cap among the measured clip lengths, and the ratio to the baseline.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .environment import DEFAULT_THREADS, REPO, boot, device_info
from .isolation import forked
from .memory import PeakMemory

GRADIENT_FRAMES_MAX = 37  # the baseline is not run beyond this (it would need several GB)
GRADIENT_SIZE_MAX = 512


@dataclass(frozen=True)
class Settings:
    frames: tuple[int, ...] = (5, 9, 17, 37, 73)  # clip lengths (1 + 4k)
    pixel_sizes: tuple[int, ...] = (256, 512, 1024)  # square TAEF2 sizes, px
    cap_frames: int = 9  # the memory cap is the gradient baseline's peak at this many frames
    steps: int = 2  # iterations per row (memory does not grow with steps)
    wan_dim: int = 32  # width of the random Wan 2.1 VAE
    threads: int = DEFAULT_THREADS
    out: Path = REPO / "bench" / "results"


def _row(kind: str, method: str, n: int, settings: Settings) -> dict:
    from tests.support import host as host_mod
    from tests.support import models

    host = host_mod.boot()
    pack = host.pack.__name__
    core = importlib.import_module(pack + ".core")
    tiled_mod = importlib.import_module(pack + ".nodes.exact_encode_tiled")
    adapter = importlib.import_module(pack + ".nodes.adapter")
    with torch.inference_mode():
        if kind == "frames":
            vae = models.random_wan21_vae(0, dim=settings.wan_dim)
            g = torch.Generator().manual_seed(0)
            base = torch.rand(1, 3, n, 8, 8, generator=g)
            x = torch.nn.functional.interpolate(base, size=(n, 64, 64), mode="trilinear").contiguous()
        else:
            vae = models.taef2_vae()
            from tests.support.images import load_photo
            from tests.support.paths import image_paths

            x = load_photo(image_paths()[0], n).movedim(-1, 1).contiguous()
    opts = core.InversionOptions(method="gradient" if method == "gradient" else "adam", steps=settings.steps)
    device = vae.device
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        if method in ("gf_whole", "gradient"):
            r = core.invert(adapter.vae_codec(vae, "auto", tuple(x.shape)), x, opts)
        elif kind == "frames":  # gf_chunked
            r = tiled_mod.run_tiled(vae, x, opts, "auto", 512, 64, temporal_size=4, temporal_overlap=4)
        else:  # gf_tiled
            r = tiled_mod.run_tiled(vae, x, opts, "auto", 256, 64)
        seconds = time.perf_counter() - t0
        assert torch.isfinite(r.latent).all()
    return dict(kind=kind, method=method, n=n, peak_mb=round(mem.peak_mb, 1), seconds=round(seconds, 2),
                megapixels=round(x.shape[-1] * x.shape[-2] / 1e6, 3), memory_method=mem.method,
                latent_shape=list(r.latent.shape))


def summarize(rows: list[dict], cap_frames: int) -> dict:
    frames = [r for r in rows if r["kind"] == "frames" and "error" not in r]
    cap = next((r["peak_mb"] for r in frames if r["method"] == "gradient" and r["n"] == cap_frames), None)
    fit = {}
    for m in ("gradient", "gf_whole", "gf_chunked"):
        ok = [r["n"] for r in frames if r["method"] == m and cap is not None and r["peak_mb"] <= cap]
        fit[m] = max(ok) if ok else 0
    ratio = {m: (round(fit[m] / fit["gradient"], 2) if fit["gradient"] else None) for m in ("gf_whole", "gf_chunked")}
    return dict(cap_mb=cap, cap_definition=f"peak of the gradient baseline at {cap_frames} frames",
                frames_under_cap=fit, ratio_to_gradient=ratio,
                goal_4x_met=bool(ratio["gf_chunked"] and ratio["gf_chunked"] >= 4))


def markdown(result: dict) -> str:
    rows, s = result["rows"], result["summary"]
    out = ["# Peak memory against frames and megapixels", "",
           f"{result['meta']['device']}, {result['meta']['threads']} threads, {result['meta']['steps']} steps per row, "
           f"peak = {rows[0].get('memory_method', '?')}.", "",
           "## Frames (random Wan 2.1 VAE, dim %d, 64 x 64 px)" % result["meta"]["wan_dim"], "",
           "| frames | gradient-free chunked (MiB) | gradient-free whole (MiB) | gradient-based (MiB) |",
           "|---|---|---|---|"]

    def cell(kind, m, n):
        r = next((r for r in rows if (r["kind"], r["method"], r["n"]) == (kind, m, n)), None)
        if r is None:
            return "not run"
        return r.get("error", f"{r['peak_mb']:.0f} ({r['seconds']:.1f} s)")

    for n in sorted({r["n"] for r in rows if r["kind"] == "frames"}):
        out.append(f"| {n} | {cell('frames', 'gf_chunked', n)} | {cell('frames', 'gf_whole', n)} | "
                   f"{cell('frames', 'gradient', n)} |")
    out += ["", f"Memory cap = {s['cap_definition']} = {s['cap_mb']} MiB. Most frames measured under the cap: "
            f"gradient-based {s['frames_under_cap']['gradient']}, "
            f"gradient-free whole {s['frames_under_cap']['gf_whole']}, "
            f"gradient-free chunked {s['frames_under_cap']['gf_chunked']} -> ratio chunked/gradient "
            f"{s['ratio_to_gradient']['gf_chunked']}, whole/gradient {s['ratio_to_gradient']['gf_whole']} "
            f"(goal >= 4: {'met' if s['goal_4x_met'] else 'NOT met'}).", "",
            "## Megapixels (TAEF2, square photo crop)", "",
            "| size (MP) | gradient-free tiled 256/64 (MiB) | gradient-free whole (MiB) | gradient-based (MiB) |",
            "|---|---|---|---|"]
    for n in sorted({r["n"] for r in rows if r["kind"] == "pixels"}):
        mp = next(r["megapixels"] for r in rows if r["kind"] == "pixels" and r["n"] == n and "megapixels" in r)
        out.append(f"| {n} px ({mp}) | {cell('pixels', 'gf_tiled', n)} | {cell('pixels', 'gf_whole', n)} | "
                   f"{cell('pixels', 'gradient', n)} |")
    return "\n".join(out) + "\n"


def run(settings: Settings, device_name: str, device_slug: str) -> int:
    rows = []
    t0 = time.perf_counter()
    jobs = []
    for n in settings.frames:
        jobs += [("frames", "gf_chunked", n), ("frames", "gf_whole", n)]
        if n <= GRADIENT_FRAMES_MAX:
            jobs.append(("frames", "gradient", n))
    for n in settings.pixel_sizes:
        jobs += [("pixels", "gf_tiled", n), ("pixels", "gf_whole", n)]
        if n <= GRADIENT_SIZE_MAX:
            jobs.append(("pixels", "gradient", n))
    for i, job in enumerate(jobs):
        row = forked(_row, *job, settings, threads=settings.threads)
        if "error" in row:
            row = dict(kind=job[0], method=job[1], n=job[2], error=row["error"].strip().splitlines()[-1])
        rows.append(row)
        print(f"[{i + 1}/{len(jobs)}] {job}: {row.get('error') or row['peak_mb']} MiB "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    result = dict(meta=dict(device=device_name, threads=settings.threads, steps=settings.steps,
                            wan_dim=settings.wan_dim, frames=list(settings.frames),
                            pixel_sizes=list(settings.pixel_sizes),
                            command=" ".join(["python", "-m", "bench.memory_scaling", *sys.argv[1:]]),
                            seconds=round(time.perf_counter() - t0, 1)),
                  summary=summarize(rows, settings.cap_frames), rows=rows)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"memory-scaling-{time.strftime('%Y-%m-%d')}-{device_slug}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"bench: wrote {out / stem}.json and .md", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


def main(argv=None) -> int:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, nargs="+", default=list(d.frames), help="clip lengths (1 + 4k)")
    p.add_argument("--pixel-sizes", type=int, nargs="+", default=list(d.pixel_sizes),
                   help="square sizes in px for TAEF2")
    p.add_argument("--cap-frames", type=int, default=d.cap_frames,
                   help="the memory cap is the gradient baseline's peak at this many frames")
    p.add_argument("--steps", type=int, default=d.steps, help="iterations per row")
    p.add_argument("--wan-dim", type=int, default=d.wan_dim, help="width of the random Wan 2.1 VAE")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--out", type=Path, default=d.out, help="output folder (default bench/results)")
    a = p.parse_args(argv)
    settings = Settings(tuple(a.frames), tuple(a.pixel_sizes), a.cap_frames, a.steps, a.wan_dim, a.threads, a.out)
    boot(settings.threads)
    _, slug, name = device_info()
    return run(settings, name, slug)


if __name__ == "__main__":
    sys.exit(main())
