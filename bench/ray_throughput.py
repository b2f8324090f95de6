#!/usr/bin/env python
"""Throughput of `exact-encode encode`: one process vs a Ray Data actor pool, same images.

    .venv/bin/python -m bench.ray_throughput                   # 32 images, 64 px, 10 steps, 2 actors
    .venv/bin/python -m bench.ray_throughput --images 8 --out /tmp/r   # quicker

Images: seeded smooth colour fields (tests/support/cli_data.py), VAE: the shared kl_f8_small.
Times, in seconds of wall clock: `total` includes loading the VAE (per actor for Ray) and, for Ray,
starting the local cluster; `steady` runs from the first finished image to the last, so it
measures the encode rate alone. Writes <out>/ray-throughput-<date>-<device>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))


def timed_run(run, todo) -> dict:
    """run(on_row) over todo; wall time in total and from the first finished image on."""
    stamps = []
    start = time.perf_counter()
    run(lambda row: stamps.append((time.perf_counter(), row["status"])))
    end = time.perf_counter()
    ok = sum(s == "ok" for _, s in stamps)
    steady = end - stamps[0][0]
    return {"images": ok, "total_s": round(end - start, 2), "steady_s": round(steady, 2),
            "images_per_s_total": round(ok / (end - start), 3),
            "images_per_s_steady": round((ok - 1) / steady, 3) if steady > 0 else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    from tests.support.library import exact_encode

    exact_encode()  # importable as exact_encode here and in the Ray workers
    import ray
    import torch

    from exact_encode.adapters.encode_job import Encoder, Settings, list_images, vae_sha256
    from exact_encode.adapters.ray_data import run_on_ray
    from exact_encode.adapters.vae_files import load_vae
    from tests.support.cli_data import kl_small_dir, make_images

    work = Path(tempfile.mkdtemp(prefix="ray_throughput_"))
    make_images(work / "in", args.images, sizes=((args.size, args.size),))
    todo = [(str(p), n) for p, n in list_images([work / "in"])]
    vae = kl_small_dir()
    settings = Settings(vae=str(vae), vae_sha256=vae_sha256(load_vae(vae).files), steps=args.steps, device="cpu")
    default_threads = torch.get_num_threads()
    single = timed_run(lambda on_row: Encoder(settings).run(todo, work / "single", on_row=on_row), todo)
    # Ray gives each 1-CPU actor one torch thread; the same for one process, for a like-for-like rate.
    torch.set_num_threads(1)
    single_1 = timed_run(lambda on_row: Encoder(settings).run(todo, work / "single1", on_row=on_row), todo)
    torch.set_num_threads(default_threads)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()
    ray.init(num_cpus=args.actors, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    startup = time.perf_counter() - t0
    distributed = timed_run(lambda on_row: run_on_ray(settings, todo, work / "ray", 1, on_row, actors=args.actors),
                            todo)
    ray.shutdown()
    distributed["cluster_start_s"] = round(startup, 2)
    ratio = {k: round(distributed[k] / single[k], 3) for k in ("images_per_s_total", "images_per_s_steady")}
    ratio_1 = {k: round(distributed[k] / single_1[k], 3) for k in ("images_per_s_total", "images_per_s_steady")}
    result = {"single_process": single, "single_process_1_thread": single_1, f"ray_{args.actors}_actors": distributed,
              "ray_over_single": ratio, "ray_over_single_1_thread": ratio_1,
              "meta": {"images": args.images, "size": args.size, "steps": args.steps, "method": settings.method,
                       "vae": "kl_f8_small", "cpus": os.cpu_count(), "torch_threads": default_threads,
                       "load_average_1min": round(os.getloadavg()[0], 2),
                       "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
                       "command": "python -m bench.ray_throughput " + " ".join(argv or sys.argv[1:]),
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ray-throughput-{datetime.date.today()}-cpu"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    rows = [(f"single process, {default_threads} torch threads", single), ("single process, 1 torch thread", single_1),
            (f"Ray, {args.actors} actors x 1 thread", distributed)]
    md = [f"# Exact encode throughput: {args.images} images {args.size} px, {args.steps} steps, CPU", "",
          "| run | images/s (total) | images/s (steady) | total s |", "|---|---|---|---|"]
    md += [f"| {name} | {r['images_per_s_total']} | {r['images_per_s_steady']} | {r['total_s']} |" for name, r in rows]
    md += ["", f"Ray / single: {ratio['images_per_s_total']}x total, {ratio['images_per_s_steady']}x steady; "
           f"Ray / single 1-thread: {ratio_1['images_per_s_total']}x total, {ratio_1['images_per_s_steady']}x steady. "
           f"Load average (1 min) at the end: {result['meta']['load_average_1min']} on {os.cpu_count()} CPUs. "
           f"Ray cluster start {distributed['cluster_start_s']} s (not in total). "
           f"Command: `{result['meta']['command']}`"]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
