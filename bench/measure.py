"""One benchmark job, run in a process of its own: `prep` (the paper's test pair for one model and
size) or `row` (one method on one model, size, dtype and image).

Everything here assumes ComfyUI was booted by tests/support/host.boot() in this process (or in
the parent this process was forked from) and gets the pack's modules from `ctx`.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import replace

import torch

# ---------------------------------------------------------------------------------------------
# Method configurations (the rows). Options are passed to core.invert as overrides; `lr` is
# relative (core scales Adam-type steps by the RMS of E(x)).

ENCODER = "encoder"
OURS = "ours"
GRAD_REF = "grad-lr0.1-cos"  # the reference gradient baseline of the summary

FREE_CONFIGS = {
    # The paper's gradient-free Adam: lr 0.01 (relative), warm-up + cosine schedule.
    "paper": dict(method="adam", lr=0.01, schedule=True),
    # Our default: exactly what core.invert does with no options (the node at learning_rate 1.0).
    OURS: dict(),
    "forward": dict(method="forward"),
    "km": dict(method="km"),
}
GRAD_CONFIGS = {
    # The paper's gradient baseline: Adam on ||D(z) - x||^2 through the decoder, no encoder passes.
    "grad-lr0.1-cos": dict(method="gradient", lr=0.1, schedule=True, track_residual=False),
    "grad-lr0.1-const": dict(method="gradient", lr=0.1, schedule=False, track_residual=False),
    "grad-lr0.03-cos": dict(method="gradient", lr=0.03, schedule=True, track_residual=False),
    "grad-lr0.03-const": dict(method="gradient", lr=0.03, schedule=False, track_residual=False),
    "grad-lr0.01-cos": dict(method="gradient", lr=0.01, schedule=True, track_residual=False),
    "grad-lr0.01-const": dict(method="gradient", lr=0.01, schedule=False, track_residual=False),
}
CHECKPOINT_FRACTIONS = (0.2, 0.5)  # gradient rows also run 20 and 50 of 100 steps


def method_configs(core_methods, default_method: str) -> dict:
    """name -> invert overrides (None for the plain encoder). Gradient-free methods that core
    offers beyond adam/forward/km (e.g. anderson) get a row of their own with core's defaults."""
    configs = {ENCODER: None, **FREE_CONFIGS}
    for m in core_methods:  # the default method already has its row: "ours"
        if m not in ("adam", "gradient", default_method) and m not in configs:
            configs[m] = dict(method=m)
    configs.update(GRAD_CONFIGS)
    return configs


def is_gradient(config: dict | None) -> bool:
    return bool(config) and config.get("method") == "gradient"


# ---------------------------------------------------------------------------------------------
# Models and data

MODELS = ("taef2", "kl_f8_small", "random_sd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACCURACY_MEANINGLESS = {"random_sd"}  # random weights: cost only


def load_vae(name: str):
    from tests.support import models

    with torch.inference_mode():  # as ComfyUI's loader node runs it
        if name == "taef2":
            return models.taef2_vae()
        if name == "kl_f8_small":
            return models.kl_f8_small_vae()
        if name == "random_sd":
            return models.random_sd_vae(0)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def photo_bchw(name: str, size: int) -> torch.Tensor:
    from tests.support.images import load_photo
    from tests.support.paths import image_paths

    import cases  # bench/cases.py: the seeded hard cases of issue 12

    if name in cases.CASES:
        return cases.make(name, size)
    if name in cases.PHOTO_CASES:
        source, transform = cases.PHOTO_CASES[name]
        return transform(photo_bchw(source, size))
    paths = {p.stem: p for p in image_paths()}
    if name not in paths:
        raise ValueError(f"unknown image {name!r}; the shared photos are {', '.join(sorted(paths))}")
    return load_photo(paths[name], size).permute(0, 3, 1, 2).contiguous()


def run_prep(job: dict, ctx) -> dict:
    """The paper's protocol, once per (model, size), in fp32: z_gt = E(photo) (posterior mode),
    x = D(z_gt) quantised to 8 bits. Every row of that model and size inverts the same x."""
    vae = load_vae(job["model"])
    size = job["size"]
    codec = ctx.adapter.vae_codec(vae, "fp32", (1, 3, size, size))
    pairs = {}
    with torch.inference_mode():
        for image in job["images"]:
            photo = photo_bchw(image, size).to(codec.device)
            z_gt = codec.encode(photo).float()
            x = (codec.decode(z_gt).float().clamp(0, 1) * 255).round() / 255
            pairs[image] = {"x": x.cpu().clone(), "z_gt": z_gt.cpu().clone()}
    torch.save(pairs, job["path"])
    return {"path": job["path"]}


# ---------------------------------------------------------------------------------------------
# Measuring

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Extra memory a block of work needs over the state before it, in MiB.

    CPU: the peak resident set size (VmHWM, reset through /proc/self/clear_refs just before the
    block) minus the resident set size at that moment, after gc and malloc_trim(0) so that freed
    heap is handed back first. Without clear_refs: ru_maxrss minus the same baseline (a peak that
    happened before the block can then hide inside it). tracemalloc is not used: it does not see
    torch's allocations. CUDA: torch.cuda.max_memory_allocated minus memory_allocated before.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before"
        else:
            self.hwm = _reset_hwm() and _proc_status_kb("VmHWM") is not None
            self.base = (_proc_status_kb("VmRSS") or 0) * 1024
            self.method = ("VmHWM (reset via /proc/self/clear_refs) - VmRSS before" if self.hwm
                           else "ru_maxrss - VmRSS before")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            if self.hwm:
                peak = _proc_status_kb("VmHWM") * 1024
            else:  # ru_maxrss is in KiB on Linux, in bytes on macOS
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            self.peak = peak - self.base
        self.peak_mb = self.peak / 2**20
        self.base_mb = self.base / 2**20
        return False


class Tracer:
    """Wraps a decode function. The solver's decode input at evaluation k is exactly the iterate
    z_k (cast to the run's dtype), so the wrapper records, per evaluation:

    - nmse_db: latent NMSE of z_k against z_gt,
    - nmse_selected_db: NMSE of the latent the solver would return if it stopped at k (its best
      iterate so far by pixel MSE, the same strict `<` rule as core's solver),
    - t_in / t_out: seconds since `start`, at decode entry and after the decode, with the
      tracer's own bookkeeping time subtracted (it is also reported as `bookkeeping_s`).
    """

    def __init__(self, z_gt, x, device, nmse_db, per_sample_mse):
        self.z_gt, self.x, self.device = z_gt, x, device
        self.nmse_db, self.mse = nmse_db, per_sample_mse
        self.t_in, self.t_out, self.nmse, self.selected = [], [], [], []
        self.book = 0.0
        self.best_err = math.inf
        self.best_nmse = math.nan
        self.t0 = None

    def start(self) -> None:
        _sync(self.device)
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0 - self.book

    def wrap(self, fn):
        def traced(z):
            _sync(self.device)
            b0 = time.perf_counter()
            self.t_in.append(b0 - self.t0 - self.book)
            n = self.nmse_db(z.detach(), self.z_gt)[0].item()
            self.book += time.perf_counter() - b0
            out = fn(z)
            _sync(self.device)
            b1 = time.perf_counter()
            err = self.mse(out.detach(), self.x)[0].item()
            if err < self.best_err:
                self.best_err, self.best_nmse = err, n
            self.nmse.append(n)
            self.selected.append(self.best_nmse)
            self.t_out.append(b1 - self.t0 - self.book)
            self.book += time.perf_counter() - b1
            return out

        return traced


def _median(values):
    return statistics.median(values) if values else None


def _r(v, digits=4):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(v, digits)


def floor_seconds(codec, x_in, z_in, repeats: int) -> float:
    """One bare decoder forward plus one encoder forward in the codec's dtype: median of repeats."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            _sync(codec.device)
            t = time.perf_counter()
            codec.decode(z_in)
            codec.encode(x_in)
            _sync(codec.device)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_row(job: dict, ctx) -> dict:
    core, metrics = ctx.core, ctx.core.metrics
    torch.manual_seed(0)
    name, config = job["method"], job["config"]
    row = {k: job[k] for k in ("method", "model", "size", "dtype", "image")}
    row.update(steps=job["steps"] if config is not None else 0,
               accuracy_meaningful=job["model"] not in ACCURACY_MEANINGLESS)

    vae = load_vae(job["model"])
    size = job["size"]
    codec = ctx.adapter.vae_codec(vae, job["dtype"], (1, 3, size, size))
    dtype, device = codec.dtype, codec.device
    pair = torch.load(job["prep"])[job["image"]]
    x = pair["x"].to(device)
    z_gt = pair["z_gt"].to(device)
    x_in, z_in = x.to(dtype), z_gt.to(dtype)
    grad = is_gradient(config)
    if grad:  # built before the measurement: the baseline is not charged for copying the decoder
        decode_grad = codec.differentiable_decode()
        codec = replace(codec, grad_decode=lambda: decode_grad)

    # Warm-up at this shape (oneDNN primitives, lazy init), outside timing and memory.
    with torch.inference_mode():
        codec.decode(z_in)
        codec.encode(x_in)
    if grad:
        zg = z_gt.clone().requires_grad_(True)
        torch.autograd.grad(metrics.per_sample_mse(decode_grad(zg), x).sum(), zg)
        del zg

    row["peak_memory_method"] = None
    if config is None:  # the plain encoder: z = E(x), no iterations
        times = []
        with PeakMemory(device) as mem, torch.inference_mode():
            for _ in range(job["repeats"]):
                _sync(device)
                t = time.perf_counter()
                z = codec.encode(x_in)
                _sync(device)
                times.append(time.perf_counter() - t)
        z = z.float()
        with PeakMemory(device) as dec_mem, torch.inference_mode():  # one bare decoder pass
            xz = codec.decode(z.to(dtype))
        row["decode_peak_mb"] = dec_mem.peak_mb
        row.update(seconds=_median(times), iters=0, best_iteration=0, stop_reason="n/a",
                   psnr_db=float(metrics.psnr_from_mse(metrics.per_sample_mse(xz, x))[0]),
                   bookkeeping_s=0.0)
        tracer = None
    else:
        tracer = Tracer(z_gt, x, device, metrics.nmse_db, metrics.per_sample_mse)
        if grad:
            traced = tracer.wrap(decode_grad)
            run_codec = replace(codec, grad_decode=lambda: traced)
        else:
            run_codec = replace(codec, decode=tracer.wrap(codec.decode))
        opts = core.InversionOptions(steps=job["steps"], **config)
        with PeakMemory(device) as mem:
            tracer.start()
            res = core.invert(run_codec, x, opts)
            _sync(device)
            seconds = tracer.now()
        z = res.latent.float()
        s = res.samples[0]
        row.update(seconds=seconds, bookkeeping_s=tracer.book, iters=s.iterations,
                   best_iteration=s.best_iteration, stop_reason=s.stop_reason, psnr_db=s.psnr_best,
                   psnr_encoder_db=s.psnr_initial, solver_residual_db_best=s.residual_db_best,
                   options=res.options)
    row.update(peak_mb=mem.peak_mb, baseline_rss_mb=mem.base_mb, peak_memory_method=mem.method)
    row["nmse_db"] = metrics.nmse_db(z, z_gt)[0].item()
    with torch.inference_mode():  # the returned latent's residual, the same way for every row
        e0 = codec.encode(x_in).float()
        r = codec.encode(codec.decode(z.to(dtype))).float() - e0
        row["residual_db"] = metrics.ratio_db(metrics.per_sample_norm(r), metrics.per_sample_norm(e0))[0].item()

    if tracer is not None:
        # Evaluation k is complete at: the next decode's entry for gradient-free methods (their
        # evaluation includes the encoder pass); right after the decode for the gradient
        # baseline (its stopping evaluation needs no backward pass: generous to the baseline).
        done = (tracer.t_out if grad else tracer.t_in[1:] + [row["seconds"]])
        row["trace"] = {"t_done": [_r(t, 5) for t in done],
                        "nmse_db": [_r(v) for v in tracer.nmse],
                        "nmse_selected_db": [_r(v) for v in tracer.selected],
                        "psnr_db": [_r(v) for v in res.trace_psnr[:, 0].tolist()]}
        row["nmse_best_iterate_db"] = min(tracer.nmse)
        steps_t = [b - a for a, b in zip(tracer.t_in, tracer.t_in[1:])]
        row["s_per_iter"] = _median(steps_t)  # median over iterations: robust to warm-up/noise
        row["s_per_iter_mean"] = sum(steps_t) / len(steps_t) if steps_t else None

    if config is None or not grad:
        row["floor_s"] = floor_seconds(codec, x_in, z_in, job["repeats"])
        if row.get("s_per_iter"):
            row["overhead_vs_floor"] = row["s_per_iter"] / row["floor_s"]

    if grad:  # separate shorter runs: the baseline's own schedule at 20 and 50 steps
        checkpoints = []
        for n in sorted({max(1, round(job["steps"] * f)) for f in CHECKPOINT_FRACTIONS} - {job["steps"]}):
            _sync(device)
            t = time.perf_counter()
            r = core.invert(codec, x, core.InversionOptions(steps=n, **config))
            _sync(device)
            checkpoints.append({"steps": n, "seconds": time.perf_counter() - t,
                                "nmse_db": metrics.nmse_db(r.latent, z_gt)[0].item()})
        checkpoints.append({"steps": job["steps"], "seconds": row["seconds"], "nmse_db": row["nmse_db"]})
        row["checkpoints"] = checkpoints

    for k, v in list(row.items()):
        if isinstance(v, float):
            row[k] = _r(v, 6)
    return row
