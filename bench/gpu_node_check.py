"""The exact-encode node and the library path on the accelerator, in every precision (bench.gpu's last stage).

On a CUDA machine ComfyUI loads a VAE in bf16 (its own choice there), so precision "auto" and "bf16" run
the shared model itself, while the CPU that the tests use loads it in fp32 and casts a copy. This runs
VAE Exact Encode as ComfyUI's executor does (loader and node under torch.inference_mode) and the
library path as a script would (core.invert outside inference mode), per VAE and precision, and writes
one row per run (error text included) to <out>/<date>-<device>-node-check.json and .md.

    python -m bench.gpu_node_check --out /tmp/x    # any device; 64 px, 20 steps
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from .environment import REPO, boot, device_info
from .measure import load_vae, photo_bchw
from .table import markdown_table

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of one image pair, by core.metrics (the same layout on both sides)."""
    from core.metrics import per_sample_mse, psnr_from_mse

    return round(float(psnr_from_mse(per_sample_mse(a.float(), b.float().to(a.device)))[0]), 2)


def node_row(ctx, vae, image, precision: str, method: str, steps: int) -> dict:
    """VAE Exact Encode under inference_mode, against stock VAE Encode, both decoded by stock VAE Decode."""
    nodes = ctx.host.nodes
    node = importlib.import_module(ctx.host.pack.__name__ + ".nodes.exact_encode").VAEExactEncode
    pixels = image.permute(0, 2, 3, 1).contiguous()
    with torch.inference_mode():
        t = time.perf_counter()
        latent = node.execute(pixels, vae, steps, method, precision=precision).result[0]
        seconds = time.perf_counter() - t
        stock = nodes.VAEEncode().encode(vae, pixels)[0]

        def decode(lat):
            return nodes.VAEDecode().decode(vae, lat)[0]
        return {"exact_psnr_db": psnr(decode(latent), pixels), "stock_psnr_db": psnr(decode(stock), pixels),
                "seconds": round(seconds, 3), "latent_dtype": str(latent["samples"].dtype)}


def library_row(ctx, vae, image, precision: str, method: str, steps: int) -> dict:
    """vae_codec and core.invert called as a script would, outside inference_mode."""
    codec = ctx.adapter.vae_codec(vae, precision, tuple(image.shape))
    x = image.to(codec.device)
    t = time.perf_counter()
    result = ctx.core.invert(codec, x, ctx.core.InversionOptions(method=method, steps=steps))
    seconds = time.perf_counter() - t
    with torch.inference_mode():
        exact = codec.decode(result.latent.to(codec.dtype)).float().clamp(0, 1)
        plain = codec.decode(codec.encode(x.to(codec.dtype))).float().clamp(0, 1)
    return {"exact_psnr_db": psnr(exact, x), "stock_psnr_db": psnr(plain, x), "seconds": round(seconds, 3),
            "latent_dtype": str(result.latent.dtype)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--models", nargs="+", default=["taef2", "kl_f8_small"])
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--methods", nargs="+", default=["anderson", "hybrid", "gradient"])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    a = p.parse_args(argv)
    ctx = boot(2, cpu=not torch.cuda.is_available())
    _, slug, name = device_info()
    image = photo_bchw("astronaut", a.size)
    rows = []
    for model in a.models:
        vae = load_vae(model)
        for path, fn in (("node", node_row), ("library", library_row)):
            for precision in a.precisions:
                for method in a.methods:
                    row = {"model": model, "vae_dtype": str(vae.vae_dtype), "path": path, "precision": precision,
                           "method": method}
                    try:
                        row.update(fn(ctx, vae, image, precision, method, a.steps))
                    except Exception as e:  # recorded, not raised: every combination gets its row
                        row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
                    rows.append(row)
                    print({k: v for k, v in row.items() if k != "traceback"}, file=sys.stderr, flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"{datetime.date.today()}-{slug}-node-check"
    meta = {"device": name, "torch": torch.__version__, "size": a.size, "steps": a.steps,
            "command": " ".join(["python", "-m", "bench.gpu_node_check", *(sys.argv[1:] if argv is None else argv)])}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    cols = ["model", "vae_dtype", "path", "precision", "method", "stock_psnr_db", "exact_psnr_db", "seconds", "error"]
    stem.with_suffix(".md").write_text(
        f"# Node and library on {name} — {datetime.date.today()}\n\n`{meta['command']}`; photo astronaut, "
        f"{a.size} px, {a.steps} steps; PSNR of the decode against the photo.\n\n"
        + "\n".join(markdown_table(cols, [[r.get(c, "") for c in cols] for r in rows])) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
