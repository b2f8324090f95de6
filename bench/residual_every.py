"""What the residual trace costs the gradient methods: `core.invert` with the residual encoded at every
iterate (`residual_every=1`, the library's default) against every 4th (the nodes' setting,
core.solver.REPORTED_RESIDUAL_EVERY) and none (`track_residual=False`, the bench's gradient protocol), side by
side in one process, interleaved, on real photos (what a node gets), fp32, no auto-stop. The latents of
the three settings must be identical (the residual is reported, never stepped on): checked per run.

    .venv/bin/python -m bench.residual_every                       # taef2 + kl_f8_small, 64 px, 100 steps
    .venv/bin/python -m bench.residual_every --images astronaut --steps 10 --repeats 1 --out /tmp/x

Writes <out>/<date>-<device>-residual-every.json and .md (default out: bench/results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

from .environment import REPO, boot, cpu_name
from .measure import load_vae, photo_bchw
from .table import markdown_table

SETTINGS = {"every 1": dict(residual_every=1), "every 4": dict(residual_every=4),
            "none": dict(track_residual=False)}


def one_cell(core, codec, x, method: str, steps: int, repeats: int) -> dict:
    seconds, latents = {name: [] for name in SETTINGS}, {}
    for _ in range(repeats):
        for name, extra in SETTINGS.items():  # interleaved: CPU drift hits every setting alike
            r = core.invert(codec, x, method=method, steps=steps, stall_steps=0, **extra)
            seconds[name].append(r.seconds)
            latents[name] = r.latent
    ref = latents["every 1"]
    return {"seconds": {n: statistics.median(s) for n, s in seconds.items()},
            "same_latent": all(torch.equal(z, ref) for z in latents.values())}


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"# Residual trace cost ({meta['date']}, {meta['device']})", "",
             f"`{meta['command']}`", "",
             "Median seconds of full runs (no auto-stop); ratio = setting / every 1. Same latent: all three "
             "settings returned the identical tensor.", ""]
    cells = [[r["model"], r["image"], r["method"], *(f"{r['seconds'][k]:.2f}" for k in ("every 1", "every 4", "none")),
              f"{r['seconds']['every 4'] / r['seconds']['every 1']:.2f}",
              f"{r['seconds']['none'] / r['seconds']['every 1']:.2f}",
              "yes" if r["same_latent"] else "NO"] for r in rows]
    lines += markdown_table(["VAE", "image", "method", "every 1 (s)", "every 4 (s)", "none (s)", "every 4 / every 1",
                             "none / every 1", "same latent"], cells)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["taef2", "kl_f8_small"])
    p.add_argument("--images", nargs="+", default=["astronaut", "coffee", "texture"])
    p.add_argument("--methods", nargs="+", default=["gradient", "diis", "hybrid"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    ctx = boot(2)
    rows = []
    for model in args.models:
        codec = ctx.adapter.vae_codec(load_vae(model), "fp32", (1, 3, args.size, args.size))
        for image in args.images:
            x = photo_bchw(image, args.size)
            for method in args.methods:
                row = dict(model=model, image=image, method=method,
                           **one_cell(ctx.core, codec, x, method, args.steps, args.repeats))
                print(row, flush=True)
                rows.append(row)
    date = datetime.date.today().isoformat()
    meta = dict(date=date, device=f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)", size=args.size,
                steps=args.steps, repeats=args.repeats,
                command="python -m bench.residual_every " + " ".join(argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{date}-cpu-residual-every"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    stem.with_suffix(".md").write_text(report(rows, meta))
    print(report(rows, meta))
    return 0 if all(r["same_latent"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
