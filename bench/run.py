"""Benchmark: exact encoding by gradient-free decoder inversion vs the plain encoder and the
gradient-based baseline, on real ComfyUI VAEs, with the paper's protocol.

    .venv/bin/python -m bench.run --quick                       # smoke run (~2 min on 2 cores), results in a temp dir
    .venv/bin/python -m bench.run --sizes 128 --models kl_f8_small taef2 --images astronaut

Writes <out>/<YYYY-MM-DD>-<device>[-<tag>].json (summary, rows, meta) and a .md table beside it.
Protocol, columns and the summary keys: bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from . import measure, report
from .environment import (DEFAULT_THREADS, REPO, boot, comfyui_version, cpu_pressure, cpu_stall_us, device_info,
                          git_state)
from .isolation import forked

BENCH = REPO / "bench"

# --quick is 32 px, not 64: on CPUs without native bf16 (AVX512-BF16/AMX) a bf16 pass is emulated,
# 15-100x slower than fp32 (taef2 at 64 px: 5.7 s per encode+decode on a 2-core AVX2 EPYC), and
# one 64 px bf16 row alone would exceed the one-minute budget.
QUICK = dict(sizes=[32], steps=10, images=["astronaut"], models=["taef2", "kl_f8_small"],
             dtypes=["fp32", "bf16"], lp_methods=[measure.OURS], lp_sizes=None, repeats=2)
FULL = dict(sizes=[128, 256], steps=100, images=None, models=list(measure.MODELS),
            dtypes=["fp32", "bf16"], lp_methods=None, lp_sizes=None, repeats=5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See bench/README.md for the protocol and every column.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 32 px, 10 steps, astronaut, taef2 + kl_f8_small, fp32 + bf16 "
                        "(bf16 only for 'ours'); results go to a temp dir unless --out is given")
    p.add_argument("--sizes", type=int, nargs="+", help="square crop sizes in px (default 128 256)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(measure.DTYPES), help="default fp32 bf16")
    p.add_argument("--steps", type=int, help="iterations of every iterative method (default 100)")
    p.add_argument("--models", nargs="+", choices=measure.MODELS, help="default: all three")
    p.add_argument("--images", nargs="+", help="shared photos by stem (default: all four)")
    p.add_argument("--methods", nargs="+", help="only these rows (default: all; see README)")
    p.add_argument("--lp-methods", nargs="+",
                   help="rows (gradient-free methods, encoder) that also run in dtypes other than fp32 "
                        "(default: all of them; --quick: ours). Gradient rows run in fp32 only.")
    p.add_argument("--lp-sizes", type=int, nargs="+",
                   help="sizes at which dtypes other than fp32 run (default: all --sizes)")
    p.add_argument("--repeats", type=int, help="repeats of the floor and encoder timings (default 5; --quick: 2)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="torch CPU threads (default 2, or $OMP_NUM_THREADS)")
    p.add_argument("--isolation", choices=("fork", "spawn", "inprocess"),
                   help="fork (default on a CPU): every job is forked from this process after ComfyUI is "
                        "imported (no tensor work happens before the fork); spawn: a fresh interpreter per job "
                        "(+~6 s each); inprocess (default on CUDA, which does not survive fork): every job in "
                        "this process, the caching allocator's peak reset per row")
    p.add_argument("--accelerator", action="store_true",
                   help="let ComfyUI use its accelerator (CUDA) instead of the CPU the tests force (bench.gpu)")
    p.add_argument("--out", help="output folder (default bench/results; --quick: a new temp dir)")
    p.add_argument("--tag", help="suffix of the output file names")
    p.add_argument("--note", help="free text recorded in meta and the markdown")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: one job as JSON (spawn isolation)
    p.add_argument("--job-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if any(s < 8 or s % 8 for s in args.sizes):
        p.error("--sizes must be multiples of 8 (>= 8)")
    return args


# ---------------------------------------------------------------------------------------------

def execute(job: dict, ctx) -> dict:
    if job["kind"] == "prep":
        return measure.run_prep(job, ctx)
    return measure.run_row(job, ctx)


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def run_job(job: dict, ctx, args, scratch: Path, n: int) -> dict:
    """Run one job in a process of its own (or, inprocess, here) and return its JSON result
    ({'error': ...} on failure)."""
    if args.isolation == "inprocess":
        try:
            return execute(job, ctx)
        except Exception:
            return {"error": traceback.format_exc()}
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if args.isolation == "fork":
        return forked(execute, job, ctx, threads=args.threads)
    out = scratch / f"job-{n}.json"
    cmd = [sys.executable, "-m", "bench.run", "--job", json.dumps(job), "--job-out", str(out),
           "--threads", str(args.threads)] + (["--accelerator"] if args.accelerator else [])
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if out.is_file():
        return json.loads(out.read_text())
    return {"error": f"worker exited with status {rc} before writing a result (out of memory?)"}


def job_main(args) -> int:
    """--job: the spawn-isolation worker."""
    ctx = boot(args.threads, cpu=not args.accelerator)
    job = json.loads(args.job)
    try:
        result, code = execute(job, ctx), 0
    except BaseException:
        result, code = {"error": traceback.format_exc()}, 1
    _write(Path(args.job_out), result)
    return code


# ---------------------------------------------------------------------------------------------

def build_jobs(args, ctx, scratch: Path) -> tuple[list, list]:
    from tests.support.paths import image_paths

    configs = measure.method_configs(ctx.core.METHODS, ctx.core.InversionOptions().method)
    if args.methods:
        unknown = set(args.methods) - set(configs)
        if unknown:
            raise SystemExit(f"unknown --methods {sorted(unknown)}; rows are: {', '.join(configs)}")
        configs = {k: v for k, v in configs.items() if k in args.methods}
    unknown = set(args.lp_methods or ()) - set(measure.method_configs(ctx.core.METHODS,
                                                                      ctx.core.InversionOptions().method))
    if unknown:
        raise SystemExit(f"unknown --lp-methods {sorted(unknown)}; rows are: {', '.join(configs)}")
    free = [m for m, c in configs.items()
            if not measure.is_gradient(c, ctx.core.PIXEL_ONLY_METHODS)]  # encoder included
    lp = set(free if args.lp_methods is None else args.lp_methods)
    images = args.images or [p.stem for p in image_paths()]
    preps, rows = [], []
    for model in args.models:
        for size in args.sizes:
            path = str(scratch / f"prep-{model}-{size}.pt")
            preps.append({"kind": "prep", "model": model, "size": size, "images": images, "path": path})
            for dtype in args.dtypes:
                for image in images:
                    for method, config in configs.items():
                        if measure.is_gradient(config, ctx.core.PIXEL_ONLY_METHODS) and dtype != "fp32":
                            continue  # core's gradient baseline always decodes in fp32
                        if dtype != "fp32" and args.lp_sizes and size not in args.lp_sizes:
                            continue
                        if dtype != "fp32" and method not in lp:
                            continue
                        rows.append({"kind": "row", "method": method, "config": config, "model": model,
                                     "size": size, "dtype": dtype, "image": image, "steps": args.steps,
                                     "repeats": args.repeats, "prep": path})
    return preps, rows


def _progress(i, n, row, t0):
    head = f"[{i:>3}/{n}] {row['model']} {row['size']}px {row['dtype']} {row['image']} {row['method']}"
    if row.get("error"):
        msg = "ERROR " + row["error"].strip().splitlines()[-1]
    else:
        def num(k):
            return float("nan") if row.get(k) is None else row[k]
        msg = (f"NMSE {num('nmse_db'):7.2f} dB, PSNR {num('psnr_db'):6.2f} dB, "
               f"{num('seconds'):8.3f} s, peak {num('peak_mb'):8.1f} MB")
        if row.get("overhead_vs_floor"):
            msg += f", {row['overhead_vs_floor']:.2f}x floor"
    print(f"{head}: {msg}  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.job:
        return job_main(args)
    t0 = time.perf_counter()
    load0, pressure0 = os.getloadavg(), cpu_pressure()
    ctx = boot(args.threads, cpu=not args.accelerator)
    device, device_slug, device_name = device_info()
    if args.isolation is None:  # CUDA does not survive fork(); its peaks can be reset per row instead
        args.isolation = "inprocess" if device.type == "cuda" else "fork" if hasattr(os, "fork") else "spawn"
    elif device.type == "cuda" and args.isolation == "fork":
        raise SystemExit("bench: --isolation fork cannot run on CUDA (CUDA does not survive fork()); "
                         "use inprocess (the default there) or spawn")
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="exact-encode-bench-")) if args.quick else BENCH / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    # inside the output folder: a clean-up of /tmp by another process cannot take the jobs away
    scratch = Path(tempfile.mkdtemp(prefix=".jobs-", dir=out_dir))
    preps, jobs = build_jobs(args, ctx, scratch)
    print(f"bench: {len(jobs)} rows on {device_name} ({args.isolation} isolation, {args.threads} threads); "
          f"results -> {out_dir}", file=sys.stderr, flush=True)

    n = 0
    for prep in preps:
        n += 1
        res = run_job(prep, ctx, args, scratch, n)
        if res.get("error"):
            print(res["error"], file=sys.stderr)
            raise SystemExit(f"bench: preparing {prep['model']} at {prep['size']} px failed")
    stem = f"{datetime.date.today().isoformat()}-{device_slug}" + (f"-{args.tag}" if args.tag else "")
    partial = out_dir / f"{stem}.partial.json"  # the rows so far: a run killed at a time limit keeps them
    rows = []
    for i, job in enumerate(jobs, 1):
        n += 1
        stall0, wall0 = cpu_stall_us(), time.perf_counter()
        res = run_job(job, ctx, args, scratch, n)
        stall1, wall1 = cpu_stall_us(), time.perf_counter()
        if res.get("error"):
            res = {**{k: job[k] for k in ("method", "model", "size", "dtype", "image", "steps")}, **res}
        if stall0 is not None and stall1 is not None:  # contention while this row ran (machine-wide)
            res["cpu_pressure_pct"] = round(100 * (stall1 - stall0) / 1e6 / (wall1 - wall0), 1)
        rows.append(res)
        _write(partial, {"rows": rows, "meta": {"partial": True, "steps": args.steps, "sizes": args.sizes,
                                                "device_name": device_name, "command": " ".join(
                                                    shlex.quote(a)
                                                    for a in ["python", "-m", "bench.run", *sys.argv[1:]])}})
        _progress(i, len(jobs), res, t0)
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()

    memory_method = next((r["peak_memory_method"] for r in rows if r.get("peak_memory_method")), None)
    meta = {
        "date": datetime.date.today().isoformat(), "device": device_slug, "device_name": device_name,
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "threads": args.threads, "quick": args.quick, "steps": args.steps, "sizes": args.sizes,
        "dtypes": args.dtypes, "lp_methods": args.lp_methods, "lp_sizes": args.lp_sizes,
        "models": args.models, "images": sorted({r["image"] for r in rows}),
        "repeats": args.repeats, "isolation": args.isolation, "memory_method": memory_method,
        "grad_ref": measure.GRAD_REF, "ours": measure.OURS,
        "configs": measure.method_configs(ctx.core.METHODS, ctx.core.InversionOptions().method),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "bench.run",
                                                     *(sys.argv[1:] if argv is None else argv)]),
        "git": git_state(), "comfyui": comfyui_version(),
        "loadavg_start": [round(v, 2) for v in load0], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "cpu_pressure_start": pressure0, "cpu_pressure_end": cpu_pressure(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "wall_s": round(time.perf_counter() - t0, 1), "note": args.note,
        "errors": sum(1 for r in rows if r.get("error")),
    }
    result = {"summary": report.summarize(rows), "rows": rows, "meta": meta}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(report.markdown(result))
    partial.unlink(missing_ok=True)
    print(f"bench: wrote {json_path} and {md_path} in {meta['wall_s']:.0f} s"
          + (f" ({meta['errors']} rows failed)" if meta["errors"] else ""), file=sys.stderr)
    for model, s in result["summary"].items():
        print(f"  {model} ({s['size']} px): speedup_to_grad100 {s['speedup_to_grad100']}, mem_ratio_vs_grad "
              f"{s['mem_ratio_vs_grad']}, overhead_vs_floor {s['overhead_vs_floor']}, bf16_mem_ratio "
              f"{s['bf16_mem_ratio']}, bf16_nmse_delta_db {s['bf16_nmse_delta_db']}", file=sys.stderr)
    return 1 if meta["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
