"""The machine a bench run happens on, and the in-process ComfyUI it measures through."""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]


def threads_from_env(value: str | None) -> int:
    """OMP_NUM_THREADS as a thread count: unset or empty 2, else its first (outermost) level -- OpenMP also takes a
    list, one count per nesting level ("4,2"). Anything else is an error naming the variable.

    >>> threads_from_env(None), threads_from_env("3"), threads_from_env(" 4,2 ")
    (2, 3, 4)
    """
    if value is None or not value.strip():
        return 2
    first = value.strip().split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        raise ValueError(f"OMP_NUM_THREADS={value!r} is not a thread count: set it to a positive integer (or a "
                         "comma-separated list of them, one per OpenMP nesting level), or unset it")
    return int(first)


# Torch threads a bench uses unless told (--threads): this machine's 2 cores, or OMP_NUM_THREADS where set (the test
# workers set it, tests/conftest.py, so that a bench the tests run takes only its worker's share of the cores).
DEFAULT_THREADS = threads_from_env(os.environ.get("OMP_NUM_THREADS"))


def boot(threads: int, cpu: bool = True) -> SimpleNamespace:
    """Import ComfyUI and the pack exactly as the tests do (tests/support/host.boot); no tensor
    work happens here. `cpu=False` lets ComfyUI pick its accelerator (bench.gpu)."""
    torch.set_num_threads(threads)
    from tests.support import host  # the repository's `tests` (run from the repository root)

    h = host.boot(cpu=cpu)
    pack = h.pack.__name__
    return SimpleNamespace(host=h, adapter=importlib.import_module(pack + ".nodes.adapter"),
                           core=importlib.import_module(pack + ".core"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info():
    """(torch device, a file-name slug, a readable name) of ComfyUI's device."""
    import comfy.model_management as mm

    dev = mm.get_torch_device()
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        return dev, "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name
    return dev, dev.type, cpu_name()


def cpu_pressure():
    """Linux PSI: % of the last 60 s in which some runnable task waited for a CPU."""
    try:
        text = Path("/proc/pressure/cpu").read_text()
        return float(re.search(r"some avg10=\S+ avg60=(\S+)", text).group(1))
    except (OSError, AttributeError, ValueError):
        return None


def cpu_stall_us():
    """Cumulative microseconds in which some runnable task waited for a CPU (PSI), or None."""
    try:
        return int(re.search(r"some .*total=(\d+)", Path("/proc/pressure/cpu").read_text()).group(1))
    except (OSError, AttributeError, ValueError):
        return None


def git_state() -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
        return {"commit": head or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def comfyui_version():
    try:
        return importlib.import_module("comfyui_version").__version__
    except Exception:
        return None


def run_meta(module: str, argv, threads: int) -> dict:
    """The date, device, threads, torch and the command line of a bench run, for its result files."""
    command = f"python -m {module} " + shlex.join(argv if argv is not None else sys.argv[1:])
    return dict(date=str(datetime.date.today()), device=device_info()[2], threads=threads, torch=torch.__version__,
                command=command)


def save_result(out: Path, name: str, meta: dict, rows: list, markdown) -> str:
    """Writes {"meta", "rows"} to <out>/<date>-<device>-<name>.json and markdown(result) beside it as .md; returns the
    markdown."""
    result = dict(meta=meta, rows=rows)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{meta['date']}-{device_info()[1]}-{name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    return text


def add_run_args(parser, sizes: list[int]) -> None:
    """--models, --sizes, --threads and --out, as the per-image benches (bench.rival, bench.rival_race) take them."""
    parser.add_argument("--models", nargs="+", default=["taef2", "kl_f8_small"])
    parser.add_argument("--sizes", type=int, nargs="+", default=sizes)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
