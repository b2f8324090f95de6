"""Issue 12's table from one bench.run result: per image x VAE, the encoder's latent NMSE, each
method's NMSE and PSNR, the default against the best gradient-free method, and the hybrid and `diis`
against the best gradient (Adam) configuration (time to reach its final PSNR, measured in the same run).

    .venv/bin/python -m bench.run --sizes 32 --steps 30 --models taef2 kl_f8_small \\
        --images flat_objects stars --methods encoder paper ours forward km hybrid grad-lr0.1-cos ...
    .venv/bin/python -m bench.convergence bench/results/<that run>.json   # writes <run>-convergence.md/.json

`--rows-from OTHER.json`: that run's rows replace the first run's of the same method, VAE, image, size and dtype (a
changed default measured again beside the plain methods' rows of an earlier run of the same protocol: the latents
compare; their seconds were not measured side by side, so the time columns then do not).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

FREE = ("paper", "ours", "forward", "km", "anderson")  # adam (paper), the default, forward, km, anderson
TIME_TARGET = 1 / 3  # the hybrid must reach the best gradient PSNR in <= 1/3 of that baseline's time


def _time_to_psnr(row: dict, target: float):
    """Seconds until the row's PSNR trace first reaches `target` (None if never)."""
    trace = row.get("trace") or {}
    for t, p in zip(trace.get("t_done", []), trace.get("psnr_db", [])):
        if p is not None and math.isfinite(p) and p >= target and t is not None:
            return t
    return None


def cell(rows: list[dict]) -> dict:
    by = {r["method"]: r for r in rows if not r.get("error")}
    enc = by["encoder"]["nmse_db"]
    free = {m: by[m] for m in FREE if m in by and m != "ours"}
    best_free = min(free, key=lambda m: free[m]["nmse_db"]) if free else None
    ours = by.get("ours")
    out = {"encoder_nmse_db": enc, "methods": {m: {"nmse_db": r["nmse_db"], "psnr_db": r["psnr_db"],
                                                   "seconds": r.get("seconds")} for m, r in by.items()}}
    if ours and best_free:
        gap = ours["nmse_db"] - min(free[best_free]["nmse_db"], ours["nmse_db"])
        out["default"] = {"best_free": best_free, "gap_db": round(gap, 2),
                          "not_worse_than_encoder": ours["nmse_db"] <= enc, "within_0p5_db": gap <= 0.5}
    grads = {m: r for m, r in by.items() if m.startswith("grad-")}  # the Adam settings: item 3's baseline
    for name in ("hybrid", "diis"):
        if grads and name in by:
            out[name] = _against_best_grad(by[name], grads)
    return out


def _against_best_grad(row: dict, grads: dict) -> dict:
    """How fast `row` reaches the 100-step PSNR of the best gradient (Adam) setting, as a share of
    that setting's time in the same run."""
    g = max(grads, key=lambda m: grads[m]["psnr_db"])
    target, base_s = grads[g]["psnr_db"], grads[g]["seconds"]
    t = _time_to_psnr(row, target)
    ratio = None if t is None else t / base_s
    return {"best_grad": g, "grad_psnr_db": target, "grad_seconds": base_s,
            "psnr_db": row["psnr_db"], "seconds_to_grad_psnr": t,
            "time_ratio": None if ratio is None else round(ratio, 3),
            "met": ratio is not None and ratio <= TIME_TARGET}


def _f(v, d=2):
    return "—" if v is None else f"{v:.{d}f}"


def _race(h: dict | None, name: str) -> str:
    if not h:
        return "—"
    return (f"{h['best_grad']} {h['grad_psnr_db']:.2f} dB in {h['grad_seconds']:.1f} s; {name} {h['psnr_db']:.2f} dB, "
            f"reaches it in {_f(h['seconds_to_grad_psnr'], 1)} s = {_f(h['time_ratio'])}x: "
            f"**{'met' if h['met'] else 'not met'}**")


def markdown(cells: dict, meta: dict, dtype: str = "fp32", merged: list | None = None) -> str:
    lines = [f"# Issue 12 table — {meta.get('date')}, {meta.get('device_name')}", "",
             f"- Run: `{meta.get('command')}`; {meta.get('steps')} steps, sizes {meta.get('sizes')}.",
             f"- Note: {meta.get('note')}", "- Table: `python -m bench.convergence <run>.json"
             + ("" if dtype == "fp32" else f" --dtype {dtype}") + f"` ({dtype} rows)."]
    for m in merged or []:
        lines.append(f"- Rows of {', '.join(m['methods'])} ({m['rows']} rows) from `{m['file']}` (`{m['command']}`, "
                     f"{m['date']}): their latents compare; their seconds were not measured side by side with "
                     "this run's.")
    lines += ["", "| VAE | image | encoder NMSE | " + " | ".join(f"{m} NMSE / PSNR" for m in cells["_methods"])
              + " | default vs best free | hybrid vs best gradient | diis vs best gradient |",
              "|---" * (5 + len(cells["_methods"])) + "|"]
    for key, c in cells.items():
        if key == "_methods":
            continue
        model, image = key
        ms = [c["methods"].get(m) for m in cells["_methods"]]
        d = c.get("default")
        dtxt = "—" if not d else (f"{d['best_free']}: gap {d['gap_db']:.2f} dB, "
                                  f"{'≤' if d['not_worse_than_encoder'] else '>'} encoder, "
                                  f"{'within' if d['within_0p5_db'] else 'NOT within'} 0.5 dB")
        lines.append(f"| {model} | {image} | {c['encoder_nmse_db']:.2f} | "
                     + " | ".join("—" if m is None else f"{m['nmse_db']:.2f} / {m['psnr_db']:.2f}" for m in ms)
                     + f" | {dtxt} | {_race(c.get('hybrid'), 'hybrid')} | {_race(c.get('diis'), 'diis')} |")
    return "\n".join(lines) + "\n"


def _row_key(row: dict) -> tuple:
    return row["method"], row["model"], row["image"], row.get("size"), row.get("dtype", "fp32")


def _replace_rows(run: dict, other: dict, path: Path) -> dict:
    """Replace `run`'s rows by `other`'s of the same key (_row_key), in place; what was taken from where."""
    new = {_row_key(r): r for r in other["rows"]}
    kept = [r for r in run["rows"] if _row_key(r) not in new]
    run["rows"] = kept + list(new.values())
    meta = other["meta"]
    return {"file": path.name, "command": meta.get("command"), "date": meta.get("date"), "rows": len(new),
            "methods": sorted({k[0] for k in new})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", help="a bench.run JSON")
    p.add_argument("--dtype", default="fp32", help="the rows of this dtype (bench.run --dtypes); default fp32")
    p.add_argument("--rows-from", action="append", default=[], metavar="RUN",
                   help="another bench.run JSON whose rows replace this run's of the same method, VAE, image, size "
                        "and dtype (output named after the last one)")
    args = p.parse_args(argv)
    path = Path(args.result)
    run = json.loads(path.read_text())
    merged = []
    for other in args.rows_from:
        path = Path(other)
        merged.append(_replace_rows(run, json.loads(path.read_text()), path))
    groups: dict = {}
    for r in run["rows"]:
        if r.get("dtype", "fp32") == args.dtype:
            groups.setdefault((r["model"], r["image"]), []).append(r)
    # a run cut at a time limit (its .partial.json) may end inside a cell: keep the cells it finished
    cells = {key: cell(rows) for key, rows in groups.items() if any(r["method"] == "encoder" for r in rows)}
    methods = [m for m in ("encoder", "paper", "ours", "forward", "km", "anderson", "hybrid", "diis")
               if any(m in c["methods"] for c in cells.values())]
    methods += sorted({m for c in cells.values() for m in c["methods"] if m.startswith("grad-")})
    md = markdown({"_methods": methods, **cells}, run["meta"], args.dtype, merged)
    stem = str(path.with_suffix(""))
    stem += "" if args.dtype == "fp32" or stem.endswith(f"-{args.dtype}") else f"-{args.dtype}"
    Path(f"{stem}-convergence.md").write_text(md)
    Path(f"{stem}-convergence.json").write_text(json.dumps(
        {"cells": [{"model": k[0], "image": k[1], **v} for k, v in cells.items()], "meta": run["meta"],
         "rows_from": merged},
        indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
