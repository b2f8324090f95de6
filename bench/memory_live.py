"""Peak memory of exact encoding against the gradient baseline, as live tensors and as RSS.

On a CPU the resident set size cannot show what gradient-free inversion saves (bench/results:
allocator slack and cached pages hide it), so every row also counts the bytes of live tensors
(bench.memory.LiveTensorPeak: the profiler's allocator events). On CUDA both columns are
torch.cuda.max_memory_allocated over the allocation before the row.

    .venv/bin/python -m bench.memory_live --sizes 256 512 --steps 20     # full-size random SD VAE

Rows: `encoder` (one bare decode + encode: the floor any method needs), `ours` (core's default
method), `ours-free` (the default without its gradient rival: gradient-free throughout, the paper's
regime), `gradient` (the bench's reference baseline, grad-lr0.1-cos: plain autograd, as the paper's); with
--methods also `ours-ckpt` / `gradient-ckpt`: the same with checkpoint="on" (core.checkpointing: the
decoder's blocks recomputed in the backward). Each row runs in a forked
process of its own on the CPU (in-process on CUDA, peaks reset per row); the decoder copy of the
gradient row is built and every row warmed up before measuring. RSS and live tensors are taken
in the same run (the profiler's own event buffer is in the RSS figure, a few MiB).
Writes <out>/<date>-<device>-memory-live.json and .md (default out: bench/results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .environment import DEFAULT_THREADS, REPO, boot, device_info
from .isolation import forked
from .measure import DTYPES, GRAD_CONFIGS, GRAD_REF, load_vae, paper_pair, photo_bchw
from .memory import LiveTensorPeak, PeakMemory

ROWS = ("encoder", "ours", "ours-free", "gradient")
OPTIONS = {"ours": {}, "ours-free": dict(rival=""), "gradient": GRAD_CONFIGS[GRAD_REF],
           "ours-ckpt": dict(checkpoint="on"), "gradient-ckpt": dict(GRAD_CONFIGS[GRAD_REF], checkpoint="on")}
METHODS = ("encoder", *OPTIONS)
BASELINES = ("gradient", "gradient-ckpt")


@dataclass(frozen=True)
class Settings:
    model: str = "random_sd"
    sizes: tuple[int, ...] = (256, 512)
    steps: int = 20
    image: str = "astronaut"
    dtype: str = "fp32"
    threads: int = DEFAULT_THREADS
    out: Path = REPO / "bench" / "results"
    methods: tuple[str, ...] = ROWS


def measure_row(ctx, method: str, size: int, s: Settings) -> dict:
    core = ctx.core
    vae = load_vae(s.model)
    codec = ctx.adapter.vae_codec(vae, s.dtype, (1, 3, size, size))
    x, z = paper_pair(codec, photo_bchw(s.image, size))
    options = dict(OPTIONS.get(method, {}))
    baseline = method in BASELINES
    if baseline:  # built before measuring: the baseline is not charged for the copy
        decode_grad = codec.differentiable_decode()
        codec = replace(codec, grad_decode=lambda: decode_grad)
    with torch.inference_mode():  # warm-up at this shape, outside the measurement
        codec.encode(codec.decode(z.to(codec.dtype)))
    if baseline:
        zg = z.clone().requires_grad_(True)
        torch.autograd.grad(decode_grad(zg).sum(), zg)
        del zg
    t = time.perf_counter()
    with PeakMemory(codec.device) as rss, LiveTensorPeak(codec.device) as live:
        if method == "encoder":
            with torch.inference_mode():
                codec.encode(codec.decode(z.to(codec.dtype)))
            iterations = 0
        else:
            iterations = core.invert(codec, x, steps=s.steps, **options).samples[0].iterations
    return dict(method=method, size=size, iterations=iterations, seconds=round(time.perf_counter() - t, 2),
                live_peak_mb=round(live.peak_mb, 2), rss_peak_mb=round(rss.peak_mb, 2),
                live_method=live.method, rss_method=rss.method)


def ratios(rows: list[dict]) -> dict:
    """Each row's peak over each baseline's (gradient, gradient-ckpt) per size, by each measure: {size: {"ours /
    gradient": {"live": .., "rss": ..}}}."""
    out = {}
    for size in sorted({r["size"] for r in rows}):
        by = {r["method"]: r for r in rows if r["size"] == size and "error" not in r}
        out[size] = {f"{m} / {b}": {key: round(by[m][f"{key}_peak_mb"] / by[b][f"{key}_peak_mb"], 4)
                                    for key in ("live", "rss") if by[b][f"{key}_peak_mb"] > 0}
                     for b in BASELINES if b in by for m in by if m != b}
    return out


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Live-tensor and RSS peak memory, {m['model']} — {m['date']}, {m['device']}, "
             f"{m['threads']} threads", "",
             f"`{m['command']}`: photo `{m['image']}` in the paper's protocol, {m['dtype']}, {m['steps']} steps; "
             f"`ours` = core's default (`{m['default_method']}`, with its auto-stop and gradient rival), `ours-free` = "
             f"the default without the rival (gradient-free), `gradient` = {GRAD_REF}; `-ckpt`: checkpoint='on' (the "
             "decoder's blocks recomputed in the backward). "
             "Live = peak bytes of live tensors over the row's start (profiler allocator events); "
             "RSS = VmHWM over VmRSS before (CPU)."
             + (" Random weights: cost only." if m["model"] == "random_sd" else ""), "",
             "| size | method | iterations | live peak (MiB) | RSS peak (MiB) | s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['method']} | error: {r['error']} | | | |")
        else:
            lines.append(f"| {r['size']} | {r['method']} | {r['iterations']} | {r['live_peak_mb']:.1f} | "
                         f"{r['rss_peak_mb']:.1f} | {r['seconds']} |")
    lines += ["", "| size | ratio | live | RSS |", "|---|---|---|---|"]
    for size, q in result["ratios"].items():
        lines += [f"| {size} | {name} | {r.get('live')} | {r.get('rss')} |" for name, r in q.items()]
    return "\n".join(lines) + "\n"


def run(s: Settings, command: str) -> dict:
    ctx = boot(s.threads, cpu=not torch.cuda.is_available())
    device, slug, name = device_info()
    rows = []
    for size in s.sizes:
        for method in s.methods:
            if device.type == "cuda":
                row = measure_row(ctx, method, size, s)
            else:
                row = forked(measure_row, ctx, method, size, s, threads=s.threads)
                if "error" in row:
                    row = dict(method=method, size=size, error=row["error"].strip().splitlines()[-1])
            rows.append(row)
            print(f"{s.model} {size}px {method}: {row}", file=sys.stderr, flush=True)
    meta = dict(asdict(s), out=str(s.out), date=str(datetime.date.today()), device=name, device_slug=slug,
                torch=torch.__version__, default_method=ctx.core.InversionOptions().method, command=command)
    return dict(meta=meta, rows=rows, ratios=ratios(rows))


def main(argv=None) -> int:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model, choices=("random_sd", "kl_f8_small", "taef2"))
    p.add_argument("--sizes", type=int, nargs="+", default=list(d.sizes))
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--image", default=d.image)
    p.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS, help="the rows, in this order")
    a = p.parse_args(argv)
    s = Settings(a.model, tuple(a.sizes), a.steps, a.image, a.dtype, a.threads, a.out, tuple(a.methods))
    command = " ".join(shlex.quote(v)
                       for v in ["python", "-m", "bench.memory_live", *(sys.argv[1:] if argv is None else argv)])
    result = run(s, command)
    s.out.mkdir(parents=True, exist_ok=True)
    stem = s.out / f"{result['meta']['date']}-{result['meta']['device_slug']}-memory-live{'-' + a.tag if a.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
