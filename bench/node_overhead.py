"""Does the ComfyUI node add overhead over the core solver? Times, in one process and interleaved,
`core.invert` on the adapter's codec against `VAEExactEncode.execute` (image conversion, cropping,
model load check, progress bar, the trace attached to the LATENT, the move to the intermediate
device) with the same settings, with the node's assumption check off and on.

    .venv/bin/python -m bench.node_overhead                  # taef2 + kl_f8_small, 128 px, 30 steps
    .venv/bin/python -m bench.node_overhead --size 64 --steps 10 --repeats 3 --out /tmp/x

Writes <out>/<date>-<device>-node-overhead.json and .md (default out: bench/results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .environment import DEFAULT_THREADS, REPO, cpu_name
from .table import markdown_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["taef2", "kl_f8_small"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tests.support import host as host_mod
    from tests.support import models
    from tests.support.images import photos

    host = host_mod.boot()
    pack = host.pack.__name__
    import importlib

    core = importlib.import_module(pack + ".core")
    adapter = importlib.import_module(pack + ".nodes.adapter")
    node = importlib.import_module(pack + ".nodes.exact_encode").VAEExactEncode
    image = photos(args.size)["astronaut"]  # (1, H, W, 3), as ComfyUI passes IMAGE

    builders = {"taef2": models.taef2_vae, "kl_f8_small": models.kl_f8_small_vae}
    method = core.InversionOptions().method  # core's default = the node's default
    rows = []
    for name in args.models:
        with torch.inference_mode():
            vae = builders[name]()

        def run_core():
            with torch.inference_mode():
                pixels = image.movedim(-1, 1)
                codec = adapter.vae_codec(vae, "auto", tuple(pixels.shape))
                return core.invert(codec, pixels, core.InversionOptions(steps=args.steps)).latent

        def run_node(check):
            with torch.inference_mode():
                return node.execute(image, vae, args.steps, method, check_assumption=check).result[0]["samples"]

        variants = {"core": run_core, "node": lambda: run_node(False), "node+check": lambda: run_node(True)}
        for fn in variants.values():  # warm-up
            fn()
        times = {k: [] for k in variants}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits all alike
            for k, fn in variants.items():
                t = time.perf_counter()
                out = fn()
                times[k].append(time.perf_counter() - t)
        ref = run_core()
        diff = (run_node(False).cpu() - ref.cpu()).abs().max().item()
        same = diff <= 1e-4
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(dict(model=name, size=args.size, steps=args.steps, repeats=args.repeats,
                         method=method, seconds_median=med, seconds_all=times, same_latent=bool(same),
                         max_abs_latent_diff=diff,
                         node_over_core=med["node"] / med["core"],
                         node_check_over_core=med["node+check"] / med["core"]))
        print(f"{name} ({method}): core {med['core']:.3f} s, node {med['node']:.3f} s "
              f"({rows[-1]['node_over_core']:.3f}x), "
              f"node+check {med['node+check']:.3f} s ({rows[-1]['node_check_over_core']:.3f}x), "
              f"same latent {same} (max |diff| {diff:.2e})")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today()}-cpu-node-overhead"
    meta = dict(torch=torch.__version__, cpu=cpu_name(),
                threads=args.threads, command=" ".join(["python", "-m", "bench.node_overhead", *sys.argv[1:]]))
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Node overhead over core.invert — {datetime.date.today()}, CPU, {args.threads} threads", "",
             f"Median of {args.repeats} interleaved runs, astronaut {args.size} px, the default method, "
             f"{args.steps} steps. "
             "`node`: VAEExactEncode.execute with check_assumption off; `node+check`: on (keeps the iterates "
             "and computes the cocoercivity check).", ""]
    lines += markdown_table(
        ["model", "core s", "node s", "node / core", "node+check s", "node+check / core", "same latent (max abs diff)"],
        [[r["model"], f"{r['seconds_median']['core']:.3f}", f"{r['seconds_median']['node']:.3f}",
          f"{r['node_over_core']:.3f}",
          f"{r['seconds_median']['node+check']:.3f}", f"{r['node_check_over_core']:.3f}",
          f"{r['same_latent']} ({r['max_abs_latent_diff']:.1e})"] for r in rows])
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
