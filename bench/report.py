"""Summary (per model) and the markdown report, from the rows alone (no torch, no ComfyUI)."""
from __future__ import annotations

from .measure import ACCURACY_MEANINGLESS, ENCODER, GRAD_CONFIGS, GRAD_REF, OURS
from .numeric import median, rounded

TARGETS = {
    # key: (label, summary metric, threshold text)
    "speed_6x": "ours reaches the gradient baseline's final (--steps) NMSE >= 6x faster",
    "memory_10pct": "ours' peak extra memory <= 10 % of the gradient baseline's",
    "overhead_1p10": "ours' time per iteration <= 1.10x the floor (one decoder + one encoder pass)",
    "bf16": "bf16 peak extra memory <= 0.55x fp32, with NMSE within 0.5 dB of fp32",
}
BF16_KEYS = ("bf16_mem_ratio", "bf16_nmse_delta_db", "bf16_peak_mb", "bf16_seconds")
RANDOM_NOTE = "cost only: random weights, accuracy meaningless"


def time_to_target(row: dict, target: float, grad: bool) -> float | None:
    """Seconds until the run would return a latent with NMSE <= target (+1e-6 dB for rounding).

    Gradient-free: the first evaluation whose best-so-far iterate (the solver's own selection
    by pixel error) meets the target, from the per-iteration trace of the full run.
    Gradient: the fastest of its separate 20/50/100-step runs that meets the target, and of the
    same first-crossing time in its 100-step run's trace (whichever is smaller: generous).
    """
    best = None
    trace = row.get("trace") or {}
    for t, n in zip(trace.get("t_done", []), trace.get("nmse_selected_db", [])):
        if t is not None and n is not None and n <= target + 1e-6:
            best = t
            break
    if grad:
        for c in row.get("checkpoints", []):
            if c["nmse_db"] is not None and c["nmse_db"] <= target + 1e-6:
                best = c["seconds"] if best is None else min(best, c["seconds"])
    return best


def _speedup(grad_row: dict | None, ours_row: dict | None, grad_name: str):
    """(speedup, reason) for one image: time of `grad_name` to its own final NMSE / ours' time."""
    if grad_row is None or ours_row is None:
        return None, f"missing row ({'gradient' if grad_row is None else 'ours'})"
    target = grad_row.get("nmse_db")
    if target is None:
        return None, f"{grad_name} has no finite NMSE"
    t_grad = time_to_target(grad_row, target, grad=True)
    t_ours = time_to_target(ours_row, target, grad=False)
    if t_ours is None:
        best = ours_row.get("nmse_best_iterate_db")
        sel = (ours_row.get("trace") or {}).get("nmse_selected_db") or [None]
        return None, (f"never reached: {grad_name} reaches {target:.2f} dB in {grad_row['steps']} steps; "
                      f"ours' returned latents reach {_fmt(min((v for v in sel if v is not None), default=None))} "
                      f"dB at best (best iterate {_fmt(best)} dB) in {ours_row['steps']} steps")
    return t_grad / t_ours, None


def _fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def _group(rows):
    index = {}
    for r in rows:
        if r.get("error"):
            continue
        index[(r["method"], r["model"], r["size"], r["dtype"], r["image"])] = r
    return index


def summarize_size(rows, model, size, grad_ref=GRAD_REF, ours=OURS) -> dict:
    idx = _group(rows)
    images = sorted({r["image"] for r in rows if r["model"] == model and r["size"] == size})

    def get(m, d, i):
        return idx.get((m, model, size, d, i))
    meaningful = model not in ACCURACY_MEANINGLESS
    out: dict = {"size": size, "images": images, "grad_ref": grad_ref, "ours": ours,
                 "accuracy_meaningful": meaningful}

    # speed: per image, then the median over images (null if any image never gets there)
    def speedups(grad_name):
        vals, reasons = {}, []
        for i in images:
            s, why = _speedup(get(grad_name, "fp32", i), get(ours, "fp32", i), grad_name)
            vals[i] = rounded(s, 3)
            if why:
                reasons.append(f"{i}: {why}")
        return vals, reasons

    if meaningful:
        per_image, reasons = speedups(grad_ref)
        out["speedup_to_grad100"] = None if reasons else rounded(median(per_image.values()), 3)
        if reasons:
            out["speedup_to_grad100_reason"] = "; ".join(reasons)
        out["speedup_per_image"] = per_image
        out["speedup_by_grad_config"] = {}
        for g in GRAD_CONFIGS:
            vals, why = speedups(g)
            out["speedup_by_grad_config"][g] = None if why else rounded(median(vals.values()), 3)
        # which gradient configuration actually did best here (median fp32 NMSE over images)
        grad_nmse = {g: median(get(g, "fp32", i) and get(g, "fp32", i)["nmse_db"] for i in images)
                     for g in GRAD_CONFIGS}
        grad_nmse = {g: v for g, v in grad_nmse.items() if v is not None}
        out["grad_nmse_db_by_config"] = {g: rounded(v) for g, v in grad_nmse.items()}
        out["grad_best_by_nmse"] = min(grad_nmse, key=grad_nmse.get) if grad_nmse else None
    else:
        out["speedup_to_grad100"] = None
        out["speedup_to_grad100_reason"] = f"{model}: {RANDOM_NOTE}"

    def med(method, dtype, key):
        return median([(get(method, dtype, i) or {}).get(key) for i in images])

    out["encoder_nmse_db"] = rounded(med(ENCODER, "fp32", "nmse_db"))
    out["ours_nmse_db"] = rounded(med(ours, "fp32", "nmse_db"))
    out["grad_ref_nmse_db"] = rounded(med(grad_ref, "fp32", "nmse_db"))
    out["ours_seconds"] = rounded(med(ours, "fp32", "seconds"))
    out["grad_ref_seconds"] = rounded(med(grad_ref, "fp32", "seconds"))
    out["ours_peak_mb"] = rounded(med(ours, "fp32", "peak_mb"), 2)
    out["grad_ref_peak_mb"] = rounded(med(grad_ref, "fp32", "peak_mb"), 2)

    # memory vs the gradient baseline, same dtype (fp32: the baseline always runs in fp32)
    ratios = []
    for i in images:
        o, g = get(ours, "fp32", i), get(grad_ref, "fp32", i)
        if o and g and g["peak_mb"] and g["peak_mb"] > 0:
            ratios.append(max(o["peak_mb"], 0.0) / g["peak_mb"])
    out["mem_ratio_vs_grad"] = rounded(median(ratios))
    # The floor of memory: one bare encoder or decoder pass of the VAE (the encoder row measures
    # both), which any method that runs the VAE needs. ours - floor is what the loop itself adds.
    floors = [max(e["peak_mb"], e["decode_peak_mb"]) for e in (get(ENCODER, "fp32", i) for i in images)
              if e and e.get("decode_peak_mb") is not None]
    out["floor_peak_mb"] = rounded(median(floors), 2)
    if out["floor_peak_mb"] is not None and out["ours_peak_mb"] is not None:
        out["loop_extra_mb"] = rounded(out["ours_peak_mb"] - out["floor_peak_mb"], 2)
        if out["grad_ref_peak_mb"]:
            out["floor_mem_ratio_vs_grad"] = rounded(out["floor_peak_mb"] / out["grad_ref_peak_mb"])
    if out["mem_ratio_vs_grad"] is None:
        out["mem_ratio_vs_grad_reason"] = "needs fp32 rows of ours and of the gradient baseline with a positive peak"

    out["overhead_vs_floor"] = rounded(med(ours, "fp32", "overhead_vs_floor"), 3)
    if out["overhead_vs_floor"] is None:
        out["overhead_vs_floor_reason"] = "needs an fp32 row of ours"
    out["floor_s"] = rounded(med(ours, "fp32", "floor_s"), 5)
    out["s_per_iter"] = rounded(med(ours, "fp32", "s_per_iter"), 5)
    dtypes = sorted({r["dtype"] for r in rows if r["model"] == model and r["size"] == size and not r.get("error")})
    out["overhead_vs_floor_by_method"] = {
        d: {m: rounded(med(m, d, "overhead_vs_floor"), 3) for m in
            sorted({r["method"] for r in rows if r["model"] == model and r["size"] == size
                    and r["dtype"] == d and r.get("overhead_vs_floor") is not None})}
        for d in dtypes}

    # bf16 against fp32, ours
    mem, delta = [], []
    for i in images:
        o32, o16 = get(ours, "fp32", i), get(ours, "bf16", i)
        if o32 and o16:
            if o32["peak_mb"] and o32["peak_mb"] > 0:
                mem.append(max(o16["peak_mb"], 0.0) / o32["peak_mb"])
            if o32.get("nmse_db") is not None and o16.get("nmse_db") is not None:
                delta.append(o16["nmse_db"] - o32["nmse_db"])
    out["bf16_mem_ratio"] = rounded(median(mem))
    if out["bf16_mem_ratio"] is None:
        out["bf16_mem_ratio_reason"] = "needs fp32 and bf16 rows of ours (with a positive fp32 peak)"
    out["bf16_peak_mb"] = rounded(med(ours, "bf16", "peak_mb"), 2)
    out["bf16_seconds"] = rounded(med(ours, "bf16", "seconds"))
    if not meaningful:
        out["bf16_nmse_delta_db"] = None
        out["bf16_nmse_delta_db_reason"] = f"{model}: {RANDOM_NOTE}"
    else:
        out["bf16_nmse_delta_db"] = rounded(sum(delta) / len(delta)) if delta else None
        if not delta:
            out["bf16_nmse_delta_db_reason"] = "needs fp32 and bf16 rows of ours"
    out["targets"] = targets(out)
    return out


def targets(s: dict) -> dict:
    """Each target: measured value(s), threshold, met (True/False, None = not measurable here)."""
    t = {}
    sp = s.get("speedup_to_grad100")
    t["speed_6x"] = {"target": TARGETS["speed_6x"], "threshold": ">= 6", "measured": sp,
                     "met": None if sp is None else sp >= 6,
                     "note": s.get("speedup_to_grad100_reason")}
    m = s.get("mem_ratio_vs_grad")
    note = s.get("mem_ratio_vs_grad_reason")
    if m is not None and s.get("floor_mem_ratio_vs_grad") is not None:
        note = (f"one bare encoder or decoder pass alone peaks at {s['floor_mem_ratio_vs_grad']:.3f}x; "
                f"the loop adds {s['loop_extra_mb']:+.1f} MB to it")
    t["memory_10pct"] = {"target": TARGETS["memory_10pct"], "threshold": "<= 0.10", "measured": m,
                         "met": None if m is None else m <= 0.10, "note": note}
    o = s.get("overhead_vs_floor")
    t["overhead_1p10"] = {"target": TARGETS["overhead_1p10"], "threshold": "<= 1.10", "measured": o,
                          "met": None if o is None else o <= 1.10, "note": s.get("overhead_vs_floor_reason")}
    r, d = s.get("bf16_mem_ratio"), s.get("bf16_nmse_delta_db")
    if r is None:
        met, note = None, s.get("bf16_mem_ratio_reason")
    elif d is None:  # memory is measurable, accuracy is not (random weights or missing rows)
        met, note = (None if r <= 0.55 else False), ("memory part " + ("met" if r <= 0.55 else "not met")
                                                     + "; NMSE part: " + str(s.get("bf16_nmse_delta_db_reason")))
    else:
        met, note = (r <= 0.55 and abs(d) <= 0.5), None
    t["bf16"] = {"target": TARGETS["bf16"], "threshold": "mem <= 0.55 and |delta NMSE| <= 0.5 dB",
                 "measured": {"bf16_mem_ratio": r, "bf16_nmse_delta_db": d}, "met": met, "note": note}
    return t


def summarize(rows) -> dict:
    """Per model: the headline at its largest size, every size under `by_size`."""
    summary = {}
    for model in sorted({r["model"] for r in rows}):
        sizes = sorted({r["size"] for r in rows if r["model"] == model})
        by_size = {str(s): summarize_size(rows, model, s) for s in sizes}
        head = dict(by_size[str(sizes[-1])])
        if head["bf16_mem_ratio"] is None:  # bf16 may run at smaller sizes only (--lp-sizes)
            for s in reversed(sizes[:-1]):
                if by_size[str(s)]["bf16_mem_ratio"] is not None:
                    for k in BF16_KEYS:
                        head.pop(k + "_reason", None)
                        head[k] = by_size[str(s)].get(k)
                        if by_size[str(s)].get(k + "_reason"):
                            head[k + "_reason"] = by_size[str(s)][k + "_reason"]
                    head["bf16_size"] = s
                    head["targets"] = targets(head)
                    break
        summary[model] = dict(head, by_size=by_size)
    return summary


# ---------------------------------------------------------------------------------------------

def _met(v):
    return {True: "**met**", False: "**not met**", None: "not measurable"}[v]


def markdown(result: dict) -> str:
    meta, summary, rows = result["meta"], result["summary"], result["rows"]
    lines = [f"# Exact Encode benchmark — {meta['date']}, {meta['device_name']}", ""]
    lines += [
        f"- Device: **{meta['device']}** ({meta['device_name']}), {meta['cpu_count']} CPU cores visible, "
        f"torch threads {meta['threads']}, torch {meta['torch']}, ComfyUI {meta.get('comfyui')}.",
        f"- Run: `{meta['command']}` (quick: {meta['quick']}), {meta['steps']} steps, sizes "
        f"{meta['sizes']}, dtypes {meta['dtypes']}, images {meta['images']}; {meta['wall_s']:.0f} s wall.",
        f"- Load average before/after: {meta['loadavg_start']} / {meta['loadavg_end']}"
        + (f"; CPU pressure (some, avg60) before/after: {meta.get('cpu_pressure_start')} / "
           f"{meta.get('cpu_pressure_end')} %" if meta.get("cpu_pressure_start") is not None else "")
        + ". Timings on a shared CPU are noisy; ratios are taken within one run.",
        f"- Peak memory: {meta['memory_method']}; each row in its own process ({meta['isolation']}).",
        f"- Reference gradient baseline: `{GRAD_REF}` (Adam on ‖D(z) − x‖², lr 0.1 relative, cosine "
        "schedule, no residual tracking). `ours` = core's default options; `paper` = adam, lr 0.01, schedule.",
    ]
    if meta.get("note"):
        lines.append(f"- Note: {meta['note']}")
    lines += ["", "## Targets (measured numbers only)", ""]
    models = list(summary)
    lines.append("| target | " + " | ".join(f"{m} ({summary[m]['size']} px)" for m in models) + " |")
    lines.append("|---|" + "---|" * len(models))
    for key, label in TARGETS.items():
        cells = []
        for m in models:
            t = summary[m]["targets"][key]
            meas = t["measured"]
            if isinstance(meas, dict):
                d = meas["bf16_nmse_delta_db"]
                txt = f"mem {_fmt(meas['bf16_mem_ratio'], 3)}x, ΔNMSE {'—' if d is None else format(d, '+.2f')} dB"
            else:
                txt = _fmt(meas, 3) + ("x" if meas is not None else "")
            if key == "bf16" and summary[m].get("bf16_size"):
                txt += f" at {summary[m]['bf16_size']} px"
            cell = f"{_met(t['met'])}: {txt}"
            if t.get("note"):
                cell += f" ({t['note']})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Summary per model", "",
              "| model | size | encoder NMSE | ours NMSE | grad-ref NMSE | ours s | grad-ref s | speedup | "
              "ours MB | grad MB | mem ratio | VAE pass MB | loop MB | s/iter | floor s | overhead | bf16 mem ratio | "
              "bf16 ΔNMSE | best grad config |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        for size, b in s["by_size"].items():
            lines.append(
                f"| {m} | {size} | {_fmt(b['encoder_nmse_db'])} | {_fmt(b['ours_nmse_db'])} | "
                f"{_fmt(b['grad_ref_nmse_db'])} | {_fmt(b['ours_seconds'])} | {_fmt(b['grad_ref_seconds'])} | "
                f"{_fmt(b['speedup_to_grad100'], 2)} | {_fmt(b['ours_peak_mb'], 1)} | "
                f"{_fmt(b['grad_ref_peak_mb'], 1)} | "
                f"{_fmt(b['mem_ratio_vs_grad'], 3)} | {_fmt(b.get('floor_peak_mb'), 1)} | "
                f"{_fmt(b.get('loop_extra_mb'), 1)} | {_fmt(b['s_per_iter'], 4)} | {_fmt(b['floor_s'], 4)} | "
                f"{_fmt(b['overhead_vs_floor'], 3)} | {_fmt(b['bf16_mem_ratio'], 3)} | "
                f"{_fmt(b['bf16_nmse_delta_db'], 2)} | {b.get('grad_best_by_nmse') or '—'} |")
    lines += ["", "## Rows", "",
              "NMSE: latent NMSE of the returned z against z_gt (dB, lower is better). PSNR: D(z) against x "
              "(dB). seconds: wall time of the run minus the harness's tracing. peak MB: extra memory over "
              "the state after model load. s/iter: median time per iteration; overhead: s/iter ÷ floor.", "",
              "| method | model | size | dtype | image | NMSE dB | PSNR dB | iters | best it | seconds | "
              "s/iter | overhead | peak MB | CPU wait % | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['model']} | {r['size']} | {r['dtype']} | {r['image']} | "
                         f"error: {r['error'].strip().splitlines()[-1][:120]} ||||||||||")
            continue
        note = RANDOM_NOTE if r["model"] in ACCURACY_MEANINGLESS else ""
        if r.get("checkpoints"):
            cps = ", ".join(f"{c['steps']} it: {c['nmse_db']:.2f} dB / {c['seconds']:.2f} s"
                            for c in r["checkpoints"][:-1])
            note = (note + "; " if note else "") + f"separate runs {cps}"
        lines.append(
            f"| {r['method']} | {r['model']} | {r['size']} | {r['dtype']} | {r['image']} | "
            f"{_fmt(r.get('nmse_db'))} | {_fmt(r.get('psnr_db'))} | {r.get('iters')} | {r.get('best_iteration')} | "
            f"{_fmt(r.get('seconds'), 3)} | {_fmt(r.get('s_per_iter'), 4)} | {_fmt(r.get('overhead_vs_floor'), 3)} | "
            f"{_fmt(r.get('peak_mb'), 1)} | {_fmt(r.get('cpu_pressure_pct'), 0)} | {note} |")
    lines.append("")
    return "\n".join(lines)
