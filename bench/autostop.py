"""How early may a run stop by itself? Full runs of the default method (auto-stop off) on the
paper's protocol record their per-iteration trace; every candidate rule (no new best for W
iterations and the residual within F dB over them) is replayed on those traces, which is exact:
the rule reads only the trace up to the iteration it stops at. A rule keeps the full run's latent
exactly when it stops at or after both the full run's best pixel iterate and its twin's pick
(core.twin: the default returns one of the two); the replay has no twin hold (the default also
waits while the twin's latent error still falls), so it shows the pixel rules alone. Then the
default rule runs for real beside the full run (same latent? time saved).

    .venv/bin/python -m bench.autostop                   # 4 photos x kl_f8_small, taef2, 128 px, 100 steps

Writes <out>/<date>-<device>-autostop.json and .md (default out: bench/results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from .environment import DEFAULT_THREADS, REPO, boot, cpu_name
from .measure import load_vae, paper_pair, photo_bchw, race_off

WINDOWS = (5, 10, 15, 20, 30, 40)
FLATS_DB = (0.25, 0.5, 1.0, 2.0, math.inf)


def replay(psnr: list[float], residual_db: list[float], window: int, flat_db: float) -> int:
    """The iteration at which core's stall rule stops a run with this trace (len - 1: never)."""
    best, since = -math.inf, 0
    for k, p in enumerate(psnr):
        if p > best:
            best, since = p, 0
        else:
            since += 1
        if 0 < window <= k and since >= window:
            span = residual_db[k - window:k + 1]
            if max(span) - min(span) <= flat_db:
                return k
    return len(psnr) - 1


def measure_case(core, codec, x, z_gt, steps: int) -> dict:
    t = time.perf_counter()
    with race_off(core):  # every step: no auto-stop, and the rival (if it runs) without its race
        full = core.invert(codec, x, steps=steps, stall_steps=0)
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    auto = core.invert(codec, x, steps=steps)
    t_auto = time.perf_counter() - t
    s_full, s_auto = full.samples[0], auto.samples[0]
    psnr = full.trace_psnr[:, 0]
    twin = full.extra.get("twin")
    return dict(psnr=[round(v, 5) for v in psnr.tolist()],
                residual_db=[round(v, 5) for v in full.trace_residual_db[:, 0].tolist()],
                best_iteration=s_full.best_iteration, selection=s_full.selection,
                pixel_best_iteration=int(torch.nonzero(psnr == psnr.nan_to_num(-math.inf).max())[0]),
                twin_iteration=twin[0]["iteration"] if twin else None,
                seconds_full=t_full, seconds_auto=t_auto,
                full_iterations=full.samples[0].iterations,  # with the default's rival: its run's iterations too
                auto_iterations=s_auto.iterations, auto_stop_reason=s_auto.stop_reason,
                same_latent=bool(torch.equal(full.latent, auto.latent)),
                psnr_full=s_full.psnr_best, psnr_auto=s_auto.psnr_best,
                nmse_full_db=core.nmse_db(full.latent, z_gt)[0].item(),
                nmse_auto_db=core.nmse_db(auto.latent, z_gt)[0].item())


def grid(cases: list[dict]) -> list[dict]:
    out = []
    for w in WINDOWS:
        for f in FLATS_DB:
            stops = [replay(c["psnr"], c["residual_db"], w, f) for c in cases]
            kept = [s >= max(c["pixel_best_iteration"], c["twin_iteration"] or 0)  # the returned one is either
                    for s, c in zip(stops, cases)]
            n = len(cases[0]["psnr"]) - 1
            out.append(dict(window=w, flat_db=None if math.isinf(f) else f, same_latent=sum(kept), cases=len(cases),
                            iterations_saved_pct=round(100 * sum(n - s for s in stops) / (n * len(cases)), 1)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["kl_f8_small", "taef2"])
    p.add_argument("--images", nargs="+", help="photo stems (default: all shared photos)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    ctx = boot(args.threads)
    from tests.support.paths import image_paths

    images = args.images or [q.stem for q in image_paths()]
    defaults = ctx.core.InversionOptions()
    cases = []
    for model in args.models:
        vae = load_vae(model)
        codec = ctx.adapter.vae_codec(vae, "fp32", (1, 3, args.size, args.size))
        for image in images:
            x, z_gt = paper_pair(codec, photo_bchw(image, args.size))
            case = dict(model=model, image=image, **measure_case(ctx.core, codec, x, z_gt, args.steps))
            cases.append(case)
            print(f"{model} {image}: best {case['best_iteration']}, auto stops at {case['auto_iterations']} "
                  f"({case['auto_stop_reason']}), same latent {case['same_latent']}, "
                  f"{case['seconds_full']:.1f} s -> {case['seconds_auto']:.1f} s", file=sys.stderr, flush=True)
    rules = grid(cases)
    t_full, t_auto = sum(c["seconds_full"] for c in cases), sum(c["seconds_auto"] for c in cases)
    summary = dict(method=defaults.method, select=defaults.select, stall_steps=defaults.stall_steps,
                   stall_flat_db=defaults.stall_flat_db,
                   same_latent=sum(c["same_latent"] for c in cases), cases=len(cases),
                   no_worse_psnr=sum(c["psnr_auto"] >= c["psnr_full"] for c in cases),
                   seconds_full=round(t_full, 2), seconds_auto=round(t_auto, 2),
                   time_saved_pct=round(100 * (1 - t_auto / t_full), 1),
                   iterations_saved_pct=iterations_saved_pct(cases))
    meta = dict(date=str(datetime.date.today()), cpu=cpu_name(), threads=args.threads, torch=torch.__version__,
                size=args.size, steps=args.steps, models=args.models, images=images,
                command=" ".join(shlex.quote(a) for a in ["python", "-m", "bench.autostop", *sys.argv[1:]]))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{meta['date']}-cpu-autostop"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, summary=summary, rules=rules, cases=cases),
                                                    indent=1))
    stem.with_suffix(".md").write_text(markdown(meta, summary, rules, cases))
    print(markdown(meta, summary, rules, cases))
    return 0


def iterations_saved_pct(cases) -> float:
    """Against the full run's own iterations (the default's rival adds its run's to both runs)."""
    full = [c.get("full_iterations", len(c["psnr"]) - 1) for c in cases]
    return round(100 * sum(f - c["auto_iterations"] for f, c in zip(full, cases)) / sum(full), 1)


def markdown(meta, s, rules, cases) -> str:
    lines = [f"# Auto-stop on the paper's protocol — {meta['date']}, CPU ({meta['cpu']}), "
             f"{meta['threads']} threads", "",
             f"`{meta['command']}`: {', '.join(meta['models'])} x {', '.join(meta['images'])}, {meta['size']} px, "
             f"{meta['steps']} steps, fp32, the default: method `{s['method']}`, "
             f"select `{s.get('select', 'pixel')}`.", "",
             f"**Default rule** (stall_steps {s['stall_steps']}, stall_flat_db {s['stall_flat_db']}): the same latent "
             f"as the full run in {s['same_latent']}/{s['cases']} cases "
             f"(PSNR no worse in {s['no_worse_psnr']}/{s['cases']}); "
             f"{s['iterations_saved_pct']} % of the iterations and {s['time_saved_pct']} % of the wall time saved "
             f"({s['seconds_full']} s -> {s['seconds_auto']} s, all cases, timings on a shared CPU).", "",
             "| model | photo | full run's returned iteration (selection) | pixel best / twin's pick | auto-stop at | "
             "reason | same latent | PSNR full / auto (dB) | NMSE full / auto (dB) | s full / auto |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(f"| {c['model']} | {c['image']} | {c['best_iteration']} ({c['selection']}) | "
                     f"{c['pixel_best_iteration']} / {c['twin_iteration']} | {c['auto_iterations']} | "
                     f"{c['auto_stop_reason']} | "
                     f"{c['same_latent']} | {c['psnr_full']:.2f} / {c['psnr_auto']:.2f} | {c['nmse_full_db']:.2f} / "
                     f"{c['nmse_auto_db']:.2f} | {c['seconds_full']:.1f} / {c['seconds_auto']:.1f} |")
    lines += ["", "## Candidate rules replayed on the full runs' traces", "",
              "No new best for W iterations and the residual within F dB over them (F = none: no residual condition); "
              "without the twin hold. Same latent: the replayed stop is at or after the pixel best and the twin's "
              "pick.", "",
              "| W | F (dB) | same latent | iterations saved |", "|---|---|---|---|"]
    for r in rules:
        lines.append(f"| {r['window']} | {r['flat_db'] if r['flat_db'] is not None else 'none'} | "
                     f"{r['same_latent']}/{r['cases']} | {r['iterations_saved_pct']} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
