"""One benchmark job, run in a process of its own: `prep` (the paper's test pair for one model and
size) or `row` (one method on one model, size, dtype and image).

Everything here assumes ComfyUI was booted by tests/support/host.boot() in this process (or in
the parent this process was forked from) and gets the pack's modules from `ctx`.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import statistics
import sys
import time
from dataclasses import replace

import torch

from .memory import PeakMemory, sync
from .numeric import median, rounded

# ---------------------------------------------------------------------------------------------
# Method configurations (the rows). Options are passed to core.invert as overrides; `lr` is
# relative (core scales Adam-type steps by the RMS of E(x)).

ENCODER = "encoder"
OURS = "ours"
GRAD_REF = "grad-lr0.1-cos"  # the reference gradient baseline of the summary

FREE_CONFIGS = {
    # The paper's gradient-free Adam: lr 0.01 (relative), warm-up + cosine schedule.
    # The plain methods return their best pixel iterate (select="pixel"), as the paper's code does.
    "paper": dict(method="adam", lr=0.01, schedule=True, stall_steps=0, select="pixel"),  # no auto-stop
    # Our default: exactly what core.invert does with no options (the node at learning_rate 1.0):
    # anderson, auto-stop, the twin problem picking the returned iterate (core.twin).
    OURS: dict(),
    # the default with the opt-in restart off the round trip's expanding directions (core.unstable): its gain and
    # cost (the 2026-12-04 results name the default with it "ours" and without it "ours-norestart")
    "ours-restart": dict(unstable_steps=20),
    # the default without its gradient rival (core.solver's `rival`): gradient-free throughout, as before 2026-12-04
    "ours-free": dict(rival=""),
    # the default with its rival started from E(x), as before session 16 (core.solver's rival_early_steps; session
    # 15's 128 px result file has this row as "ours-rival-ex" and the start from the first step as "ours")
    "ours-rival-ex": dict(rival_early_steps=0),
    # the default without its second rival run from the first run's pixel-best (session 17)
    "ours-one-rival": dict(rival_from_pixel_best=False),
    # the default stopping at the first iterate at the noise level, as before session 20 (core.polish's floor_steps)
    "ours-no-polish": dict(floor_steps=0),
    "forward": dict(method="forward", select="pixel"),
    "km": dict(method="km", select="pixel"),
    "anderson": dict(method="anderson", select="pixel"),  # the default before the twin (issue 12)
}
GRAD_CONFIGS = {
    # The paper's gradient baseline: Adam on ||D(z) - x||^2 through the decoder, no encoder passes,
    # every step run (no auto-stop), as the paper's protocol has it.
    "grad-lr0.1-cos": dict(method="gradient", lr=0.1, schedule=True, track_residual=False, stall_steps=0),
    "grad-lr0.1-const": dict(method="gradient", lr=0.1, schedule=False, track_residual=False, stall_steps=0),
    "grad-lr0.03-cos": dict(method="gradient", lr=0.03, schedule=True, track_residual=False, stall_steps=0),
    "grad-lr0.03-const": dict(method="gradient", lr=0.03, schedule=False, track_residual=False, stall_steps=0),
    "grad-lr0.01-cos": dict(method="gradient", lr=0.01, schedule=True, track_residual=False, stall_steps=0),
    "grad-lr0.01-const": dict(method="gradient", lr=0.01, schedule=False, track_residual=False, stall_steps=0),
    # DIIS-accelerated pixel-gradient steps (core.diis), under the same protocol
    "diis": dict(method="diis", track_residual=False, stall_steps=0),
}
# The hybrid under the same protocol: its gradient phase does not encode (as the rows above)
HYBRID_CONFIGS = {"hybrid": dict(method="hybrid", track_residual=False, stall_steps=0)}
CHECKPOINT_FRACTIONS = (0.2, 0.5)  # gradient rows also run 20 and 50 of 100 steps


def method_configs(core_methods, default_method: str) -> dict:
    """name -> invert overrides (None for the plain encoder). Gradient-free methods that core
    offers beyond adam/forward/km (e.g. anderson) get a row of their own with core's defaults."""
    configs = {ENCODER: None, **FREE_CONFIGS, **HYBRID_CONFIGS}
    for m in core_methods:  # the default method already has its row: "ours"
        if m not in ("adam", "gradient", default_method) and m not in configs:
            configs[m] = dict(method=m)
    configs.update(GRAD_CONFIGS)
    return configs


def is_gradient(config: dict | None, pixel_only: tuple) -> bool:
    """Backpropagates through the decoder: one of core's PIXEL_ONLY_METHODS (fp32 rows only)."""
    return bool(config) and config.get("method") in pixel_only


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


def image_rows(ctx, models, sizes, images, make_row) -> list[dict]:
    """make_row(codec, model, image, size) for each model, size and image, with the pack's fp32 codec of the VAE
    (loaded once per model); each row is echoed to stderr as it comes."""
    rows = []
    for model in models:
        vae = load_vae(model)
        for size in sizes:
            codec = ctx.adapter.vae_codec(vae, "fp32", (1, 3, size, size))
            for image in images:
                rows.append(make_row(codec, model, image, size))
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


@contextlib.contextmanager
def race_off(core):
    """The default's rivals without their race, so they run all their steps: core.twin.CATCH_UP = inf (a twin could
    catch up at any rate) and TOO_CLOSE_DB = inf (no pace rules a second rival out before it starts, or stops it:
    core.twin.off_pace). The race is a stop rule, off where a run must be the whole one."""
    twin = importlib.import_module(core.__name__ + ".twin")
    saved = twin.CATCH_UP, twin.TOO_CLOSE_DB
    twin.CATCH_UP = twin.TOO_CLOSE_DB = math.inf
    try:
        yield
    finally:
        twin.CATCH_UP, twin.TOO_CLOSE_DB = saved


def photo_bchw(name: str, size: int) -> torch.Tensor:
    from tests.support.images import load_photo
    from tests.support.paths import image_paths

    from . import cases  # the seeded hard cases of issue 12

    if name in cases.CASES:
        return cases.make(name, size)
    if name in cases.PHOTO_CASES:
        source, transform = cases.PHOTO_CASES[name]
        return transform(photo_bchw(source, size))
    paths = {p.stem: p for p in image_paths()}
    if name not in paths:
        raise ValueError(f"unknown image {name!r}; the shared photos are {', '.join(sorted(paths))}")
    return load_photo(paths[name], size).permute(0, 3, 1, 2).contiguous()


def paper_pair(codec, photo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, z_gt) of the paper's protocol: z_gt = E(photo), x = D(z_gt) in 8 bits, on the codec's device."""
    with torch.inference_mode():
        z_gt = codec.encode(photo.to(codec.device)).float()
        x = (codec.decode(z_gt).float().clamp(0, 1) * 255).round() / 255
    return x, z_gt


def run_prep(job: dict, ctx) -> dict:
    """The paper's protocol, once per (model, size), in fp32: z_gt = E(photo) (posterior mode),
    x = D(z_gt) quantised to 8 bits. Every row of that model and size inverts the same x."""
    vae = load_vae(job["model"])
    size = job["size"]
    codec = ctx.adapter.vae_codec(vae, "fp32", (1, 3, size, size))
    pairs = {}
    for image in job["images"]:
        x, z_gt = paper_pair(codec, photo_bchw(image, size))
        pairs[image] = {"x": x.cpu().clone(), "z_gt": z_gt.cpu().clone()}
    torch.save(pairs, job["path"])
    return {"path": job["path"]}


# ---------------------------------------------------------------------------------------------
# Measuring

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
        sync(self.device)
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0 - self.book

    def drop_first(self) -> None:
        """Forget the first traced decode (a setup call, not an iterate); its time stays in the total."""
        for log in (self.t_in, self.t_out, self.nmse, self.selected):
            del log[0]

    def wrap(self, fn, skip=lambda: False):
        """`skip()` True: a decode that is not an iterate (core.unstable.side_evaluations): timed, not traced."""
        def traced(z):
            if skip():
                return fn(z)
            sync(self.device)
            b0 = time.perf_counter()
            self.t_in.append(b0 - self.t0 - self.book)
            n = self.nmse_db(z.detach(), self.z_gt)[0].item()
            self.book += time.perf_counter() - b0
            out = fn(z)
            sync(self.device)
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


def floor_seconds(codec, x_in, z_in, repeats: int) -> float:
    """One bare decoder forward plus one encoder forward in the codec's dtype: median of repeats."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            sync(codec.device)
            t = time.perf_counter()
            codec.decode(z_in)
            codec.encode(x_in)
            sync(codec.device)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_row(job: dict, ctx) -> dict:
    core, metrics = ctx.core, ctx.core.metrics
    torch.manual_seed(0)
    config = job["config"]
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
    grad = is_gradient(config, ctx.core.PIXEL_ONLY_METHODS)
    hybrid = bool(config) and config.get("method") == "hybrid"
    if grad or hybrid:  # built before the measurement: no method is charged for copying the decoder
        decode_grad = codec.differentiable_decode()
        codec = replace(codec, grad_decode=lambda: decode_grad)

    # Warm-up at this shape and at the doubled batch the default's twin runs (oneDNN primitives, cuDNN's
    # algorithm choice, lazy init), outside timing and memory.
    with torch.inference_mode():
        for n in (1, 2):
            codec.encode(codec.decode(torch.cat([z_in] * n)))
            codec.encode(torch.cat([x_in] * n))
    if grad or hybrid:
        zg = z_gt.clone().requires_grad_(True)
        torch.autograd.grad(metrics.per_sample_mse(decode_grad(zg), x).sum(), zg)
        del zg

    row["peak_memory_method"] = None
    if config is None:  # the plain encoder: z = E(x), no iterations
        times = []
        with PeakMemory(device) as mem, torch.inference_mode():
            for _ in range(job["repeats"]):
                sync(device)
                t = time.perf_counter()
                z = codec.encode(x_in)
                sync(device)
                times.append(time.perf_counter() - t)
        z = z.float()
        with PeakMemory(device) as dec_mem, torch.inference_mode():  # one bare decoder pass
            xz = codec.decode(z.to(dtype))
        row["decode_peak_mb"] = dec_mem.peak_mb
        row.update(seconds=median(times), iters=0, best_iteration=0, stop_reason="n/a",
                   psnr_db=float(metrics.psnr_from_mse(metrics.per_sample_mse(xz, x))[0]),
                   bookkeeping_s=0.0)
        tracer = None
    else:
        tracer = Tracer(z_gt, x, device, metrics.nmse_db, metrics.per_sample_mse)
        if grad:
            traced = tracer.wrap(decode_grad)
            run_codec = replace(codec, grad_decode=lambda: traced)
        else:  # the hybrid's gradient steps decode through the differentiable copy: traced too
            side = importlib.import_module(core.__name__ + ".unstable").in_side_evaluation
            traced_grad = tracer.wrap(decode_grad, side) if hybrid else None  # not its memory estimate's crops
            run_codec = replace(codec, decode=tracer.wrap(codec.decode, side),
                                grad_decode=(lambda: traced_grad) if hybrid else codec.grad_decode)
        opts = core.InversionOptions(steps=job["steps"], **config)
        with PeakMemory(device) as mem:
            tracer.start()
            res = core.invert(run_codec, x, opts)
            sync(device)
            seconds = tracer.now()
        if "twin" in res.extra:  # the first decode built the twin image (core.twin), not an iterate
            tracer.drop_first()
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
        row["trace"] = {"t_done": [rounded(t, 5) for t in done],
                        "nmse_db": [rounded(v) for v in tracer.nmse],
                        "nmse_selected_db": [rounded(v) for v in tracer.selected],
                        "psnr_db": [rounded(v) for v in res.trace_psnr[:, 0].tolist()]}
        row["nmse_best_iterate_db"] = min(tracer.nmse)
        steps_t = [b - a for a, b in zip(tracer.t_in, tracer.t_in[1:])]
        row["s_per_iter"] = median(steps_t)  # median over iterations: robust to warm-up/noise
        row["s_per_iter_mean"] = sum(steps_t) / len(steps_t) if steps_t else None

    if config is None or not grad:
        row["floor_s"] = floor_seconds(codec, x_in, z_in, job["repeats"])
        if row.get("s_per_iter"):
            row["overhead_vs_floor"] = row["s_per_iter"] / row["floor_s"]

    if grad:  # separate shorter runs: the baseline's own schedule at 20 and 50 steps
        checkpoints = []
        for n in sorted({max(1, round(job["steps"] * f)) for f in CHECKPOINT_FRACTIONS} - {job["steps"]}):
            sync(device)
            t = time.perf_counter()
            r = core.invert(codec, x, core.InversionOptions(steps=n, **config))
            sync(device)
            checkpoints.append({"steps": n, "seconds": time.perf_counter() - t,
                                "nmse_db": metrics.nmse_db(r.latent, z_gt)[0].item()})
        checkpoints.append({"steps": job["steps"], "seconds": row["seconds"], "nmse_db": row["nmse_db"]})
        row["checkpoints"] = checkpoints

    for k, v in list(row.items()):
        if isinstance(v, float):
            row[k] = rounded(v, 6)
    return row
