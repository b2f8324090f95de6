"""The prepared accelerator run (issue 12): on a CUDA machine, in <= 8 minutes, the fp32 / fp16 /
bf16 rows of the paper's protocol, the memory rows (live tensors = torch.cuda.max_memory_allocated
there), the node and the library path in every precision (bench.gpu_node_check: ComfyUI keeps VAEs
in bf16 there, unlike the CPU the tests use) and issue 12's table per VAE (the default and the plain
methods, the hybrid, diis and three Adam settings on the photos and hard cases, 128 px;
bench.convergence makes its table); each stage a subprocess with its share of the time, so a slow
stage cannot eat the others', and every row is written as it finishes.

    bash bench/gpu.sh                 # on the GPU machine: results under $OUT (or bench/results)
    bash bench/gpu.sh --quick         # the same stages, tiny, on whatever device there is (CI, CPU)

Writes <out>/gpu-run.json (what ran, exit status and time per stage) beside each stage's own files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .environment import REPO

HYBRID_NAMES = ("hybrid", "auto")  # a core method whose name contains one of these


def hybrid_methods() -> list[str]:
    from core.methods import METHODS  # the repository's core, without ComfyUI

    return [m for m in METHODS if any(h in m for h in HYBRID_NAMES)]


# Issue 12's table: the shared photos and the hard cases (bench/cases.py), most telling first, so a
# stage cut at its time limit (rows are written as they finish) keeps the cells that matter most.
TABLE_IMAGES = ["astronaut", "stars", "texture", "flat_objects", "rocket", "coffee", "chelsea", "clipped", "flat_noise"]
TABLE_METHODS = ["encoder", "paper", "ours", "ours-free", "forward", "km", "anderson", "diis", "grad-lr0.1-cos",
                 "grad-lr0.03-const", "grad-lr0.01-const"]


# every bench.memory_live row: the plain ones and those with the decoder's blocks recomputed (checkpoint "on")
MEMORY_ROWS = ["encoder", "ours", "ours-free", "gradient", "ours-ckpt", "gradient-ckpt"]


def stages(quick: bool, cuda: bool, out: Path) -> list[tuple[str, list[str], int]]:
    """(name, module argv, seconds allowed). The full shares add up to 470 s of the 480 s."""
    accel = ["--accelerator"] if cuda else []
    found = hybrid_methods()
    if quick:
        # fp16 convolutions are emulated on most CPUs (25 s for one 32 px row here): CUDA only
        dtypes = ["fp32", "fp16", "bf16"] if cuda else ["fp32", "bf16"]
        rows = ["--quick", "--models", "taef2", "--dtypes", *dtypes, "--steps", "3",
                "--methods", "encoder", "ours", "grad-lr0.1-cos", "--lp-methods", "ours", "--repeats", "1"]
        memory = ["--model", "kl_f8_small", "--sizes", "32", "--steps", "2", "--methods", *MEMORY_ROWS]
        table = ["--quick", "--dtypes", "fp32", "--steps", "3", "--repeats", "1", "--images", "astronaut", "stars",
                 "--methods", "encoder", "ours", *found, "diis", "grad-lr0.1-cos"]
        table_models = ["taef2"]
        node = ["--size", "32", "--steps", "2", "--models", "taef2", "--precisions", "auto", "fp32",
                "--methods", "anderson", "gradient"]
        shares = (900, 450, 450, 450)  # not the 8-minute run: generous for shared CI machines
    else:
        rows = ["--sizes", "256", "--models", "taef2", "kl_f8_small", "--images", "astronaut",
                "--dtypes", "fp32", "fp16", "bf16", "--steps", "100",
                "--methods", "encoder", "paper", "ours", "forward", "km", "grad-lr0.1-cos", "grad-lr0.1-const",
                "--lp-methods", "encoder", "paper", "ours", "--repeats", "3"]
        memory = ["--sizes", "256", "512", "--steps", "20", "--methods", *MEMORY_ROWS]
        table = ["--sizes", "128", "--images", *TABLE_IMAGES, "--dtypes", "fp32", "--steps", "100", "--repeats", "1",
                 "--methods", *TABLE_METHODS[:6], *found, *TABLE_METHODS[6:]]
        table_models = ["taef2", "kl_f8_small"]
        node = ["--size", "64", "--steps", "20"]
        # measured on an H200 (bench/results/2026-12-04-cuda-*): precision 52 s, memory 27 s (four rows; six now,
        # not measured there), node check ~45 s, a 99-row table ~175 s; the tables' images are ordered so that a cut
        # loses the least telling cells
        shares = (80, 60, 60, 135)
    plan = [("precision rows", ["bench.run", *rows, *accel, "--out", str(out), "--tag", "gpu-precision"], shares[0]),
            ("memory rows", ["bench.memory_live", *memory, "--out", str(out), "--tag", "gpu"], shares[1]),
            ("node check", ["bench.gpu_node_check", *node, "--out", str(out)], shares[2])]
    for model in table_models:  # one stage per VAE: a slow one cannot take the other's share
        plan.append((f"issue 12 table {model}", ["bench.run", *table, "--models", model, *accel, "--out", str(out),
                                                 "--tag", f"gpu-table-{model}"], shares[3]))
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny stages that pass on a CPU in a few minutes")
    p.add_argument("--out", type=Path, help="output folder (default: $OUT, else bench/results; --quick: a temp dir)")
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("bench.gpu: no CUDA device here; run with --quick for the CPU smoke version", file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="exact-encode-gpu-")) if args.quick
                       else Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    report = {"quick": args.quick, "cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "out": str(out), "stages": []}
    if not hybrid_methods():
        print(f"bench.gpu: no method named like {' / '.join(HYBRID_NAMES)} in core.METHODS: the tables "
              "have no hybrid rows", file=sys.stderr)
    t_start = time.perf_counter()
    for name, cmd, allowed in stages(args.quick, cuda, out):
        t = time.perf_counter()
        print(f"bench.gpu: {name}: python -m {' '.join(cmd)} (up to {allowed} s)", file=sys.stderr, flush=True)
        try:
            rc = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, timeout=allowed).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        report["stages"].append({"name": name, "command": "python -m " + " ".join(cmd), "returncode": rc,
                                 "seconds": round(time.perf_counter() - t, 1)})
        if name.startswith("issue 12 table"):  # the table of whatever rows the stage finished
            tag = cmd[cmd.index("--tag") + 1]
            for result in sorted(out.glob(f"*-{tag}.json")) or sorted(out.glob(f"*-{tag}.partial.json")):
                subprocess.run([sys.executable, "-m", "bench.convergence", str(result)], cwd=REPO,
                               stdout=subprocess.DEVNULL, timeout=60)
        (out / "gpu-run.json").write_text(json.dumps(report, indent=1))
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "gpu-run.json").write_text(json.dumps(report, indent=1))
    print(f"bench.gpu: wrote {out} in {report['seconds']} s", file=sys.stderr)
    return 0 if all(s.get("returncode", 0) == 0 for s in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
