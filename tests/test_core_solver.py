"""Unit tests of core/ with plain torch: no ComfyUI anywhere."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from core import Codec, InversionOptions, invert
from core import metrics, rival, run_state
from core.schedule import paper_lr


def linear_codec(dtype=torch.float32, enc_gain=0.9, mix=None):
    """D(z) = M z per pixel after 2x nearest upsampling, E = enc_gain * 2x average pooling.
    E(D(z)) - E(x) = enc_gain (M z - pool(x)): cocoercive when M is symmetric positive definite,
    so the forward step converges for small rho; D(z) = x is solvable for x in D's range."""
    m = mix if mix is not None else torch.tensor([[1.0, 0.2, 0.1], [0.2, 0.9, 0.2], [0.1, 0.2, 1.1]])
    m = m.to(dtype)
    up = torch.nn.Upsample(scale_factor=2)
    pool = torch.nn.AvgPool2d(2)

    def dec(z):
        return up(torch.einsum("ij,bjhw->bihw", m, z.to(dtype)))

    def enc(x):
        return enc_gain * pool(x.to(dtype))

    return Codec(encode=enc, decode=dec, dtype=dtype, grad_decode=lambda: dec), dec


def target(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, dec = linear_codec()
    z = 0.2 + 0.5 * torch.rand(batch, 3, 4, 4, generator=g)
    return dec(z).clamp(0, 1), z


def test_paper_schedule_warmup_cosine_and_freeze():
    lrs = [paper_lr(k, 100, 1.0) for k in range(150)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # 10 warm-up steps
    assert all(a >= b for a, b in zip(lrs[10:80], lrs[11:80]))  # cosine decay
    assert lrs[79] == lrs[80] == lrs[149] > 0  # frozen after 80 % of the 100-step horizon
    short = [paper_lr(k, 30, 1.0) for k in range(30)]
    assert short[2] == pytest.approx(1.0) and short[23] == short[29]  # horizon = min(steps, 100)


@pytest.mark.parametrize("method", ["forward", "km", "anderson", "adam", "gradient", "diis"])
def test_every_method_improves_a_solvable_problem(method):
    codec, _ = linear_codec()
    x, _ = target()
    r = invert(codec, x, method=method, steps=60)
    s = r.samples[0]
    assert s.psnr_best > s.psnr_initial + 10, s
    assert r.latent.dtype == torch.float32 and r.latent.shape == (1, 3, 4, 4)


def test_forward_step_converges_to_the_exact_latent():
    codec, _ = linear_codec()
    x, z_true = target()
    r = invert(codec, x, method="forward", lr=0.8, steps=200)
    assert torch.allclose(r.latent, z_true, atol=1e-4)
    assert r.samples[0].residual_db_best < -80


def test_anderson_beats_the_plain_forward_step_on_a_linear_problem():
    mix = torch.tensor([[1.0, 0.6, 0.3], [0.6, 1.0, 0.6], [0.3, 0.6, 1.0]])  # ill-conditioned
    codec, _ = linear_codec(mix=mix)
    x, _ = target()
    plain = invert(codec, x, method="forward", steps=15)
    fast = invert(codec, x, method="anderson", steps=15)
    assert fast.samples[0].residual_db_best < plain.samples[0].residual_db_best - 20


@pytest.mark.parametrize("method", ["forward", "km", "anderson", "adam"])
def test_channels_last_latents_are_updated(method):
    codec, dec = linear_codec()

    def enc(x):
        return codec.encode(x).contiguous(memory_format=torch.channels_last)
    x, _ = target()
    r = invert(Codec(enc, dec), x, method=method, steps=20)
    assert r.samples[0].psnr_best > r.samples[0].psnr_initial + 5


def test_anderson_safeguard_survives_a_bad_direction():
    codec, _ = linear_codec(enc_gain=-0.9)  # residual grows under any plain step
    x, _ = target()
    r = invert(codec, x, method="anderson", steps=30, rival="")  # the fixed point alone (no gradient rival)
    assert r.samples[0].psnr_best == r.samples[0].psnr_initial and torch.isfinite(r.latent).all()
    rescued = invert(codec, x, method="anderson", steps=30)  # the default's diis rival solves it (from E(x): no
    # fixed-point iterate decoded better)
    assert rescued.extra["rival"]["chosen"] == [0] and rescued.samples[0].psnr_best > r.samples[0].psnr_best + 20
    s = rescued.samples[0]
    assert s.best_iteration <= s.iterations and rescued.trace_psnr[s.best_iteration, 0] == s.psnr_best


def test_the_rival_starts_from_the_pixel_best_of_the_first_fixed_point_iterates():
    """Like the hybrid's restart (core.hybrid.EARLY_STEPS): the first fixed-point step gains before the latent
    drifts, so the rival (and its twin) can start from the pixel-best of E(x) and the first rival_early_steps
    iterates (the default: 1; 0 starts from E(x)), computed on each image alone."""
    codec, _ = linear_codec()
    x, _ = target()
    seen = {}

    def callback(k, steps, info):  # the rival's iterations come after the first run's, with `steps` grown
        seen.setdefault(steps, []).append(info["psnr"][0])

    for early in (None, 0, 3):  # None: the default
        seen.clear()
        options = ({} if early is None else {"rival_early_steps": early}) | {"rival_from_pixel_best": False}
        r = invert(codec, x, method="forward", lr=0.3, steps=10, callback=callback, **options)
        assert r.extra["rival"]["samples"] == [0]
        first, rival = [psnr for _, psnr in sorted(seen.items())]
        k = InversionOptions().rival_early_steps if early is None else early
        assert rival[0] == pytest.approx(max(first[:k + 1]), abs=1e-4), early
        assert rival[0] > first[0] + 3 if k > 0 else rival[0] == pytest.approx(first[0], abs=1e-4)
        said = {0: "from E(x) on 1 image", 1: "from the pixel-best of E(x) and the first fixed-point step on 1 image",
                3: "from the pixel-best of E(x) and the first 3 fixed-point steps on 1 image"}[k]
        assert f"diis rival run {said}(s)" in r.summary(), r.summary()
    with pytest.raises(ValueError, match="rival_early_steps must be an integer >= 0"):
        invert(codec, x, rival_early_steps=-1)


def test_the_rival_runs_again_from_the_first_runs_pixel_best_iterate():
    """Where the first run's twin turned unstable early, its pick is early while the real run kept closing in; the
    rival then also starts from the first run's pixel-best iterate (its twin from its own), judged against the pick
    standing after the first rival; in a batch that start is each image's own (a run of it alone)."""
    codec, _ = linear_codec()
    x, _ = target()
    seen = {}

    def callback(k, steps, info):  # each rival's iterations come after the runs before it, `steps` grown each time
        seen.setdefault(steps, []).append(info["psnr"][0])

    r = invert(codec, x, method="forward", lr=0.3, steps=10, callback=callback)
    first, early, again = [psnr for _, psnr in sorted(seen.items())]
    assert again[0] == pytest.approx(max(first), abs=1e-4) and max(first) > early[0] + 1
    again_report = r.extra["rival"]["from_pixel_best"]
    assert again_report["samples"] == [0] and len(again_report["twin_nmse_db"]) == 1
    assert "rival run again from the first run's pixel-best iterate on image(s) 1" in r.summary(), r.summary()
    assert set(again_report["chosen"]) <= set(r.extra["rival"]["chosen"])
    seen.clear()
    invert(codec, x, method="forward", lr=0.3, steps=10, callback=callback, rival_from_pixel_best=False)
    assert len(seen) == 2  # the first run and one rival
    pair, _ = target(batch=2, seed=3)
    both = invert(codec, pair, method="forward", lr=0.3, steps=10)
    alone = [invert(codec, pair[i:i + 1], method="forward", lr=0.3, steps=10) for i in range(2)]
    assert both.extra["rival"]["from_pixel_best"]["samples"] == [0, 1]
    for i in range(2):
        assert torch.allclose(both.latent[i], alone[i].latent[0], atol=1e-6)
        assert both.samples[i].selection == alone[i].samples[0].selection
    with pytest.raises(ValueError, match="rival_from_pixel_best must be True or False"):
        invert(codec, x, rival_from_pixel_best=1)


@pytest.mark.parametrize("bad", [-1, 2.5])
def test_floor_steps_must_be_a_whole_number_of_steps(bad):
    (codec, _), (x, _) = linear_codec(), target()
    with pytest.raises(ValueError, match="floor_steps must be an integer >= 0"):
        invert(codec, x, floor_steps=bad)


def test_a_decoder_autograd_cannot_run_skips_the_default_rival_and_says_why():
    """The rival is part of the default; where its gradient decoder cannot be built (a host whose model cannot be
    copied for autograd), the run returns the fixed point's pick and the summary names the error."""
    codec, dec = linear_codec(enc_gain=-0.9)  # the case the rival rescues (test above)
    x, _ = target()

    def unbuildable():
        raise RuntimeError("Only Tensors created explicitly by the user support the deepcopy protocol")

    r = invert(Codec(encode=codec.encode, decode=dec, grad_decode=unbuildable), x, method="anderson", steps=30)
    alone = invert(codec, x, method="anderson", steps=30, rival="")
    assert r.extra["rival"]["skipped"].startswith("no differentiable decoder here (RuntimeError: Only Tensors")
    assert r.extra["rival"]["chosen"] == [] and torch.equal(r.latent, alone.latent)
    assert "diis rival not run: no differentiable decoder here (RuntimeError" in r.summary()
    with pytest.raises(RuntimeError, match="deepcopy"):  # asked for by name, a gradient method still raises
        invert(Codec(encode=codec.encode, decode=dec, grad_decode=unbuildable), x, method="diis", steps=5)


def test_best_iterate_is_never_worse_than_the_encoder():
    # An encoder that points the wrong way: every step makes D(z) worse.
    codec, _ = linear_codec(enc_gain=-0.9)
    x, _ = target()
    z0 = codec.encode(x)
    r = invert(codec, x, method="forward", steps=20, rival="")  # the fixed point's own guarantee
    assert torch.equal(r.latent, z0.float())
    s = r.samples[0]
    assert s.best_iteration == 0 and s.psnr_best == s.psnr_initial
    assert s.psnr_final < s.psnr_initial
    restarted = invert(codec, x, method="forward", steps=20, unstable_steps=20, rival="")  # the opt-in restart too
    assert restarted.extra["unstable"][0]["restarted"] and torch.equal(restarted.latent, z0.float())


def test_divergence_guard_stops_and_keeps_the_best():
    codec, _ = linear_codec(enc_gain=-0.9)
    x, _ = target()
    r = invert(codec, x, method="forward", lr=5.0, steps=200, divergence=10.0, rival="")
    s = r.samples[0]
    assert s.stop_reason == "diverged" and s.iterations < 200
    assert s.psnr_best == s.psnr_initial


def nan_after(dec, calls: int):
    """`dec`, decoding to NaN from call calls + 1 on."""
    count = {"n": 0}

    def flaky(z):
        count["n"] += 1
        out = dec(z)
        return out * float("nan") if count["n"] > calls else out
    return flaky


def test_nan_decode_is_treated_as_divergence():
    codec, dec = linear_codec()
    flaky = nan_after(dec, 3)
    x, _ = target()  # select="pixel": this counts decode calls, and the twin's setup would add one
    r = invert(Codec(codec.encode, flaky), x, method="adam", steps=50, select="pixel")
    s = r.samples[0]
    assert s.stop_reason == "diverged" and s.iterations == 3
    assert torch.isfinite(r.latent).all()


def test_tolerance_and_patience_stop_early():
    codec, _ = linear_codec()
    x, _ = target()
    r = invert(codec, x, method="forward", lr=0.8, steps=500, tolerance=1e-3)
    s = r.samples[0]
    assert s.stop_reason == "tolerance" and s.iterations < 500
    assert s.residual_db_final <= -60
    bad, _ = linear_codec(enc_gain=-0.9)
    r = invert(bad, x, method="forward", steps=100, patience=5, rival="")
    assert r.samples[0].stop_reason == "patience" and r.samples[0].iterations == 5
    # the restart: the same rule
    r = invert(bad, x, method="forward", steps=100, patience=5, unstable_steps=20, rival="")
    assert r.extra["unstable"][0]["restarted"] and r.samples[0].stop_reason == "patience"
    assert r.samples[0].iterations == 11  # both runs' iterations and the restart's start


def test_batch_gives_the_same_per_sample_result_as_single_runs():
    codec, _ = linear_codec()
    x, _ = target(batch=3)
    for method in ("adam", "anderson"):
        opts = InversionOptions(method=method, steps=40, tolerance=0.05)
        batch = invert(codec, x, opts)
        for i in range(3):
            single = invert(codec, x[i:i + 1], opts)
            assert torch.allclose(batch.latent[i], single.latent[0], atol=1e-5)
            assert batch.samples[i].stop_reason == single.samples[0].stop_reason
            assert batch.samples[i].iterations == single.samples[0].iterations


def test_a_stopped_sample_is_frozen_while_others_continue():
    codec, dec = linear_codec()
    calls = {"n": 0}

    def second_sample_breaks(z):  # sample 1 decodes to NaN from the 4th call on
        calls["n"] += 1
        out = dec(z)
        if calls["n"] > 3:
            out[1] = float("nan")
        return out

    x, _ = target(batch=2)
    r = invert(Codec(codec.encode, second_sample_breaks), x, method="forward", lr=0.8, steps=40, select="pixel")
    a, b = r.samples
    assert (a.stop_reason, a.iterations) == ("max_steps", 40)
    assert (b.stop_reason, b.iterations) == ("diverged", 3)
    assert r.trace_psnr.shape == (41, 2)
    assert torch.isnan(r.trace_psnr[4:, 1]).all() and torch.isfinite(r.trace_psnr[:, 0]).all()
    assert torch.isfinite(r.latent).all() and a.psnr_best > a.psnr_initial + 10


def test_deterministic():
    codec, _ = linear_codec()
    x, _ = target(batch=2)
    a, b = invert(codec, x, steps=30), invert(codec, x, steps=30)
    assert torch.equal(a.latent, b.latent)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_codec_keeps_fp32_state(dtype):
    codec, _ = linear_codec(dtype=dtype)
    x, _ = target()
    r = invert(codec, x, method="adam", steps=60, rival="")  # the fixed point's own progress in each precision
    ref = invert(linear_codec()[0], x, method="adam", steps=60, rival="")
    assert r.latent.dtype == torch.float32 and r.dtype == str(dtype).replace("torch.", "")
    assert r.samples[0].psnr_best > r.samples[0].psnr_initial + 10
    # 16-bit passes cap the reachable accuracy, not the progress
    assert r.samples[0].psnr_best > min(ref.samples[0].psnr_best, 45) - 5


def test_gradient_method_works_inside_inference_mode_with_inference_weights():
    with torch.inference_mode():
        conv = torch.nn.Conv2d(3, 3, 1)  # parameters created here are inference tensors
        conv.weight.copy_(torch.tensor([[1.0, 0.2, 0.1], [0.2, 0.9, 0.2], [0.1, 0.2, 1.1]]).view(3, 3, 1, 1))
        conv.bias.zero_()  # E = pooling is not D's inverse, so E(x) is not the best latent
        up = torch.nn.Upsample(scale_factor=2)

        def dec(z):
            return up(conv(z))

        def grad_decode():
            import copy
            with torch.inference_mode(False):
                c = copy.deepcopy(conv)
            return lambda z: up(c(z))

        codec = Codec(encode=torch.nn.AvgPool2d(2), decode=dec, grad_decode=grad_decode)
        x = up(torch.rand(1, 3, 4, 4)) * 0.5
        x[..., ::2, ::2] += 0.1  # not in D's range, so the encoder is not exact
        r = invert(codec, x, method="gradient", steps=30)
    assert r.samples[0].psnr_best >= r.samples[0].psnr_initial
    assert r.samples[0].best_iteration > 0


def test_gradient_method_needs_a_differentiable_decoder():
    codec, dec = linear_codec()
    x, _ = target()
    with pytest.raises(ValueError, match="differentiable decoder"):
        invert(Codec(codec.encode, dec), x, method="gradient", steps=2)


def test_gradient_without_residual_tracking_reports_nan_residual():
    codec, _ = linear_codec()
    x, _ = target()
    r = invert(codec, x, method="gradient", steps=5, track_residual=False)
    assert math.isnan(r.samples[0].residual_db_final)
    assert math.isfinite(r.samples[0].residual_db_initial)


@pytest.mark.parametrize("method", ["gradient", "diis", "hybrid"])
def test_residual_every_encodes_only_every_nth_iterate_and_leaves_the_latent_alone(method):
    codec, _ = linear_codec()
    x, _ = target(batch=2)
    encodes = []

    def counting_encode(img):
        encodes.append(1)
        return codec.encode(img)

    opts = dict(method=method, steps=13, stall_steps=0, select="pixel")
    every = invert(codec, x, **opts)
    strided = invert(dataclasses.replace(codec, encode=counting_encode), x, residual_every=4, **opts)
    assert torch.equal(strided.latent, every.latent)  # the residual is only reported, never stepped on
    seen = torch.isfinite(strided.trace_residual_db[:, 0]).nonzero().flatten().tolist()
    if method == "hybrid":  # its fixed-point phase needs every residual, the strided ones after it
        assert set(range(0, 14, 4)) <= set(seen)
    else:
        assert seen == [0, 4, 8, 12]
        # E(x), the 4 strided iterates, and once the returned latents where one was not among them
        assert len(encodes) == 1 + 4 + any(s.best_iteration % 4 for s in strided.samples)
    for s_strided, s_every in zip(strided.samples, every.samples):  # the summary's residual is always there
        assert s_strided.residual_db_best == pytest.approx(s_every.residual_db_best, abs=1e-3)


def test_auto_stops_flatness_skips_iterates_whose_residual_was_not_encoded():
    nan = math.nan
    window = torch.tensor([[-20.0, nan], [nan, nan], [-20.5, nan], [nan, nan]])
    spread = run_state.spread_db(window)
    assert spread[0].item() == pytest.approx(0.5)
    assert spread[1].item() == -math.inf  # no residual in the window: the pixel rule alone decides


def test_residual_every_is_checked():
    codec, _ = linear_codec()
    x, _ = target()
    with pytest.raises(ValueError, match="residual_every must be an integer >= 1"):
        invert(codec, x, method="gradient", residual_every=0)
    with pytest.raises(ValueError, match="multiple of residual_every"):
        invert(codec, x, method="gradient", residual_every=4, record_every=6)
    assert InversionOptions(method="anderson", residual_every=4).residual_stride == 1  # its step is the residual
    assert InversionOptions(method="diis", residual_every=4).residual_stride == 4


def test_callback_sees_every_iteration_and_can_cancel():
    codec, _ = linear_codec()
    x, _ = target()
    seen = []

    def cb(k, total, info):
        seen.append((k, total, len(info["psnr"])))
        if k == 4:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        invert(codec, x, steps=10, callback=cb)
    assert seen == [(k, 10, 1) for k in range(5)]


def test_host_reads_the_stats_only_every_sync_every_iterations(monkeypatch):
    """The loop never waits for the device between sync points: the callback for iterations
    k-3..k runs only once evaluation k is done, 4 at a time (decodes counted), and every k is still seen once."""
    monkeypatch.setattr(run_state, "SYNC_SECONDS", math.inf)  # only the iteration count triggers
    codec, _ = linear_codec()
    decodes = []
    counting = Codec(codec.encode, lambda z: decodes.append(1) or codec.decode(z))
    x, _ = target()
    seen = []
    invert(counting, x, steps=10, sync_every=4, select="pixel",  # the twin's setup decode would add one
           callback=lambda k, total, info: seen.append((k, len(decodes))))
    assert [k for k, _ in seen] == list(range(11))
    assert [n for _, n in seen] == [4] * 4 + [8] * 4 + [11] * 3


@pytest.mark.parametrize("method", ["adam", "forward", "km", "anderson"])
def test_results_do_not_depend_on_sync_every(method):
    codec, _ = linear_codec()
    x, _ = target(batch=2)
    runs = [invert(codec, x, method=method, steps=30, patience=3, tolerance=1e-3, sync_every=n) for n in (1, 7)]
    assert torch.equal(runs[0].latent, runs[1].latent)
    assert runs[0].samples == runs[1].samples
    assert torch.equal(runs[0].trace_psnr.nan_to_num(), runs[1].trace_psnr.nan_to_num())


@pytest.mark.parametrize("method", ["adam", "forward", "km", "anderson"])
def test_the_loop_allocates_nothing_latent_sized_beyond_the_codec(method):
    """Issue 4: in-place updates, no per-iteration allocation but the model's own. The profiler
    records every CPU allocation; those of at least half a latent that happen outside the codec's
    encode/decode must not grow with the number of steps (the codec's own do: not vacuous)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    up, pool = torch.nn.Upsample(scale_factor=8), torch.nn.AvgPool2d(8)

    def in_codec(fn):
        def run(t):
            with record_function("codec"):
                return fn(t)
        return run

    codec = Codec(in_codec(lambda x: 0.9 * pool(x)), in_codec(lambda z: up(z)))
    x = torch.rand(1, 3, 128, 128)
    latent_bytes = 3 * 16 * 16 * 4

    def allocations(steps):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            invert(codec, x, method=method, steps=steps, sync_every=4)
        inside = outside = 0
        for e in prof.events():
            if e.name == "codec" or e.cpu_memory_usage < latent_bytes // 2:
                continue
            parent = e.cpu_parent
            while parent is not None and parent.name != "codec":
                parent = parent.cpu_parent
            inside += parent is not None
            outside += parent is None
        return inside, outside

    (in_a, out_a), (in_b, out_b) = allocations(6), allocations(14)
    assert in_b - in_a >= 8 * 2  # the codec's outputs: one image and one latent per iteration
    assert out_b == out_a, (out_a, out_b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(lr=0.0), "learning rate"), (dict(lr=-1.0), "learning rate"),
    (dict(tolerance=-0.1), "tolerance"), (dict(method="newton"), "method"),
    (dict(momentum=1.0), "momentum"), (dict(patience=-1), "patience"), (dict(memory=0), "memory"),
    (dict(select="best"), "select"),
    (dict(sync_every=0), "sync_every"),
])
def test_bad_options_are_rejected_with_the_name(kwargs, match):
    codec, _ = linear_codec()
    x, _ = target()
    with pytest.raises(ValueError, match=match):
        invert(codec, x, **kwargs)


@pytest.mark.parametrize("image, match", [
    (torch.rand(0, 3, 4, 4), "empty"), (torch.rand(1, 1, 4, 4), r"\(B, 3, H, W\)"),
    (torch.full((1, 3, 4, 4), float("nan")), "NaN"),
])
def test_bad_images_are_rejected(image, match):
    codec, _ = linear_codec()
    with pytest.raises(ValueError, match=match):
        invert(codec, image)


def test_result_serialises_to_json_and_summarises():
    codec, _ = linear_codec()
    x, _ = target(batch=2)
    r = invert(codec, x, steps=5)
    d = json.loads(json.dumps(r.to_dict()))
    assert len(d["samples"]) == 2 and len(d["trace"]["psnr"]) == 2 and len(d["trace"]["psnr"][0]) == 6
    assert "image 2: PSNR" in r.summary() and InversionOptions().method in r.summary()


def test_metrics():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[1] += 0.1
    mse = metrics.per_sample_mse(a, b)
    assert mse.tolist() == pytest.approx([0.0, 0.01])
    assert metrics.psnr_from_mse(mse)[1].item() == pytest.approx(20.0)
    assert math.isinf(metrics.psnr_from_mse(mse)[0].item())
    z = torch.ones(1, 4, 2, 2)
    assert metrics.nmse_db(z * 1.1, z).item() == pytest.approx(-20.0, abs=1e-4)


def test_core_imports_without_comfyui():
    """core/ is pure PyTorch: importing it in a fresh interpreter loads no comfy module."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = "import sys, core; print(sorted(m for m in sys.modules if m.split('.')[0].startswith('comfy')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for path in (repo / "core").glob("*.py"):
        text = path.read_text()
        assert "import comfy" not in text and "from comfy" not in text, path


def test_methods_and_default_lr_derive_from_the_registry():
    import core
    from core import methods
    assert core.METHODS == tuple(methods.METHOD_REGISTRY)
    assert core.DEFAULT_LR == {name: m.default_lr for name, m in methods.METHOD_REGISTRY.items()}
    with pytest.raises(ValueError, match="family"):
        methods.Method("newton", 1.0, lambda s: None)


def test_a_method_of_family_both_gets_the_residual_always_and_the_pixel_gradient_when_it_asks(monkeypatch):
    """One registry entry adds a hybrid: its stepper sees the whole evaluation; the pixel gradient
    it asked for is autograd's gradient of the pixel error at that iterate."""
    from core import methods
    from core.steppers import Forward
    seen = []

    class Probe:  # forward steps on the residual; asks for the pixel gradient at odd iterations
        def __init__(self, setup):
            self.forward = Forward(setup.lr)

        def wants_pixel_grad(self, k):
            return k % 2 == 1

        def step(self, z, ev, active):
            seen.append((z.clone(), ev.residual is not None, None if ev.pixel_grad is None else ev.pixel_grad.clone()))
            self.forward.step(z, ev.residual, active)

    monkeypatch.setitem(methods.METHOD_REGISTRY, "probe", methods.Method("both", 0.5, Probe))
    codec, dec = linear_codec()
    x, _ = target()
    r = invert(codec, x, method="probe", steps=6)
    assert torch.equal(r.latent, invert(codec, x, method="forward", lr=0.5, steps=6, rival="").latent)
    assert [(has_res, g is not None) for _, has_res, g in seen] == [(True, k % 2 == 1) for k in range(6)]
    z, _, g = seen[3]
    zg = z.requires_grad_(True)
    (expected,) = torch.autograd.grad(metrics.per_sample_mse(dec(zg), x).sum(), zg)
    assert torch.allclose(g, expected)


def off_range_target():
    """x outside D's range: the fixed point of E(D(z)) = E(x) is not the pixel-error minimum, so
    the best iterate comes early and the rest of the run only drives the residual to its floor."""
    x, _ = target()
    x = x.clone()
    x[..., ::2, ::2] += 0.1
    return x


@pytest.mark.parametrize("method", ["forward", "anderson"])
def test_auto_stop_returns_the_full_runs_latent_when_the_best_is_early(method):
    codec, _ = linear_codec()
    x = off_range_target()
    full = invert(codec, x, method=method, steps=300, stall_steps=0, rival="")
    # the default auto-stop on the fixed point alone: the rival's twin here ends at fp32's noise (-140 dB), where a
    # stop anywhere changes which run wins; with the rival, bench.autostop measures it on the bench cells
    auto = invert(codec, x, method=method, steps=300, rival="")
    assert full.samples[0].stop_reason == "max_steps" and full.samples[0].best_iteration < 50
    s = auto.samples[0]
    assert s.stop_reason == "stalled" and s.iterations < 100, s
    assert torch.equal(auto.latent, full.latent)
    assert s.best_iteration == full.samples[0].best_iteration
    assert "stalled (no new best in 20 iterations" in auto.summary()


def test_auto_stop_waits_while_the_twins_latent_error_still_falls():
    """select "twin" returns its twin's pick (core.twin): the pixel stall rule alone would stop before that pick is
    reached (measured: at iteration 74 of a pick at 89), so the run waits for the twin, and stopping early
    returns exactly the full run's latent. (Here the pick comes after the pixel-best, so `auto` would return the
    pixel-best: test_auto_never_returns_an_iterate_past_the_pixel_best.)"""
    codec, _ = linear_codec()
    x = off_range_target()
    rule = dict(method="forward", lr=0.2, steps=400, stall_steps=10, stall_flat_db=math.inf, rival="", select="twin")
    full = invert(codec, x, **{**rule, "stall_steps": 0})
    auto = invert(codec, x, **rule)
    twin_pick = full.extra["twin"][0]["iteration"]
    pixel_stop = invert(codec, x, **{**rule, "select": "pixel"}).samples[0].iterations
    assert pixel_stop < twin_pick, "the case must be one the pixel rule alone gets wrong"
    s = auto.samples[0]
    assert s.stop_reason == "stalled" and twin_pick + 10 <= s.iterations < 400
    assert s.selection == "twin" and torch.equal(auto.latent, full.latent)


def test_auto_never_returns_an_iterate_past_the_pixel_best():
    """Where the twin picks an iterate after the pixel-best, the decode only got worse from the pixel-best on, and
    auto returns the pixel-best (extra["twin"][0]["why"] "pixel best first"); the twin's record is kept."""
    codec, _ = linear_codec()
    x = off_range_target()
    rule = dict(method="forward", lr=0.2, steps=120, stall_steps=0, rival="")
    auto, twin, pixel = (invert(codec, x, **rule, select=s) for s in ("auto", "twin", "pixel"))
    assert pixel.samples[0].best_iteration < twin.samples[0].best_iteration, "the case must have the pick after"
    assert auto.extra["twin"][0]["why"] == "pixel best first" and auto.samples[0].selection == "pixel"
    assert torch.equal(auto.latent, pixel.latent) and auto.samples[0] == pixel.samples[0]
    assert auto.extra["twin"][0]["iteration"] == twin.samples[0].best_iteration
    assert "best at iteration" in auto.summary() and "twin picked a later one" in auto.summary()
    assert "twin picked a later one" not in twin.summary()


def test_auto_stop_waits_while_the_residual_still_moves():
    """No new best for stall_steps iterations is not enough while the residual keeps falling:
    with the flatness condition relaxed to infinity the same run stops earlier."""
    codec, _ = linear_codec()
    x = off_range_target()
    # select="pixel": best_iteration is then the pixel best the stop rule counts from
    strict = invert(codec, x, method="forward", steps=300, stall_steps=10, stall_flat_db=1.0, select="pixel").samples[0]
    loose = invert(codec, x, method="forward", steps=300, stall_steps=10, stall_flat_db=math.inf,
                   select="pixel").samples[0]
    assert loose.stop_reason == strict.stop_reason == "stalled"
    assert loose.iterations == loose.best_iteration + 10 < strict.iterations


def test_time_budget_stops_a_run_and_returns_its_best_so_far():
    """A decoder that sleeps 20 ms: 10 000 steps would take minutes, a 0.3 s budget stops the run
    at a sync point after it (no timing assertion: only that it stopped early, and why)."""
    import time as time_mod
    codec, _ = linear_codec()
    slow = Codec(codec.encode, lambda z: time_mod.sleep(0.02) or codec.decode(z))
    x = off_range_target()
    r = invert(slow, x, method="forward", steps=10_000, stall_steps=0, time_budget=0.3)
    s = r.samples[0]
    assert s.stop_reason == "time_budget" and 0 < s.iterations < 10_000
    assert s.psnr_best >= s.psnr_initial
    assert r.trace_psnr.shape[0] == s.iterations + 1
    assert "time_budget (0.3 s spent)" in r.summary()


@pytest.mark.parametrize("kwargs, match", [
    (dict(stall_steps=-1), "stall_steps"), (dict(stall_steps=2.5), "stall_steps"),
    (dict(stall_flat_db=0.0), "stall_flat_db"), (dict(time_budget=-1.0), "time_budget"),
    (dict(time_budget=math.inf), "time_budget"),
])
def test_bad_stop_options_are_rejected_with_the_name(kwargs, match):
    codec, _ = linear_codec()
    with pytest.raises(ValueError, match=match):
        invert(codec, target()[0], **kwargs)


def test_the_differentiable_decoder_is_built_once_per_codec():
    """hybrid with a memory cap estimates its need with the differentiable decoder and then steps
    with it: one copy of the decoder, not two (the factory usually deep-copies the model)."""
    import torch

    from core import Codec, invert

    built = []
    up = torch.nn.Upsample(scale_factor=2)

    def grad_decode():
        built.append(1)
        return lambda z: up(z).clamp(0, 1)

    codec = Codec(encode=torch.nn.AvgPool2d(2), decode=lambda z: up(z).clamp(0, 1), grad_decode=grad_decode)
    x = torch.rand(2, 3, 8, 8)
    invert(codec, x, method="hybrid", steps=12, memory_limit_mb=1000.0)
    invert(codec, x, method="gradient", steps=3)
    assert built == [1]


def test_the_summary_says_which_rival_run_the_returned_pick_came_from():
    """extra["rival"]["chosen"] holds every sample returning a rival's pick; where the second run (from the first run's
    pixel-best) replaced the early rival's pick, the early rival's line must not claim it."""
    from core.result import InversionResult
    report = {"method": "diis", "candidates": [0, 1], "samples": [0, 1], "chosen": [0, 1], "skipped": None,
              "outmatched": [], "early_steps": 1, "twin_nmse_db": [-20.0, -21.0],
              "from_pixel_best": {"samples": [0, 1], "chosen": [1], "twin_nmse_db": [-19.0, -25.0],
                                  "outmatched": [[0, 20]]}}
    r = InversionResult(latent=torch.zeros(2, 3, 4, 4), samples=[], trace_psnr=torch.zeros(1, 2),
                        trace_residual_db=torch.zeros(1, 2), seconds=1.0, method="anderson", dtype="float32",
                        extra={"rival": report})
    early, again, stopped = r.notes()[:3]
    assert early.endswith("first fixed-point step on 2 image(s) whose decode stayed below the noise floor; its pick "
                          "returned for image(s): 1")
    assert again.endswith("rival run again from the first run's pixel-best iterate on image(s) 1, 2; its pick returned "
                          "for image(s): 2")
    assert "stopped early for image(s): 1 (its iteration 20)" in stopped
    assert r.rival_outcome(0) == r.rival_outcome(1) == "chosen"


def test_the_second_rival_is_not_run_where_even_the_first_rivals_pace_could_not_win_nor_against_an_unfaithful_pick():
    """core.rival._off_pace_from: a rival from the first run's pixel-best runs only where its twin, gaining the
    early rival's pace for all its steps, could get within TOO_CLOSE_DB of the standing pick's twin (the solver gives
    no pace where that twin did not stand for its run: a faithful rival would win whatever its error). The summary
    says so."""
    from core.result import InversionResult
    codec = Codec(encode=lambda x: x, decode=lambda z: z)
    x = torch.rand(1, 3, 4, 4)
    start = torch.stack([x[0], x[0] * (1 + 0.1)])  # the twin row 20 dB from its answer E(x) = x
    standing = {"latent_nmse_db": -30.0, "faithful": True}
    assert rival._off_pace_from(start, codec, x, 0, standing, pace=0.05, steps=100)  # -25 dB at best
    assert not rival._off_pace_from(start, codec, x, 0, standing, pace=0.1, steps=100)  # -30: could win
    # no pace: no early rival, or an unfaithful pick
    assert not rival._off_pace_from(start, codec, x, 0, standing, pace=None, steps=100)
    report = {"method": "diis", "candidates": [0], "samples": [0], "chosen": [0], "skipped": None, "outmatched": [],
              "early_steps": 1, "twin_nmse_db": [-20.0], "twin_gain_db": [5.0],
              "from_pixel_best": {"samples": [], "chosen": [], "twin_nmse_db": [], "outmatched": [],
                                  "twin_gain_db": [], "off_pace": [0], "unjudged": [1]}}
    r = InversionResult(latent=torch.zeros(1, 3, 4, 4), samples=[], trace_psnr=torch.zeros(1, 1),
                        trace_residual_db=torch.zeros(1, 1), seconds=1.0, method="anderson", dtype="float32",
                        extra={"rival": report})
    assert any(line.startswith("diis rival not run again from the first run's pixel-best iterate on image(s) 1: at the "
                               "first rival's pace") for line in r.notes()), r.notes()
    assert any(line.startswith("diis rival not run again from the first run's pixel-best iterate on image(s) 2: the "
                               "returned pick's twin did not stand for it") for line in r.notes()), r.notes()
    # the summary has one line per sample that starts "image N:" (a node test counts them); notes say "image(s)"
    assert not any("image " in line for line in r.notes()), r.notes()


@pytest.mark.parametrize("make,match", [
    (lambda x: x * 255, r"image values span [0-9.]+\.\.2[0-9][0-9]; invert takes pixels in \[0, 1\].* image / 255"),
    (lambda x: x * 2 - 1, r"image values span -0\.[0-9]+\.\..*\(image \+ 1\) / 2"),
    (lambda x: (x * 255).round().to(torch.uint8), r"image is torch.uint8; .* image.float\(\) / 255"),
    (lambda x: x[..., :7, :], r"image is 8x7 px, but this VAE decodes its latent to 8x6 px: crop or resize"),
])
@pytest.mark.parametrize("method", ["anderson", "diis"])
def test_an_image_in_another_convention_or_size_is_a_named_error(make, match, method):
    """0..255 values, a [-1, 1] tensor (diffusers' preprocessing), 8-bit integers and sides that are not multiples of
    the latent cell each ran before: a latent for the wrong numbers, or a shape error from deep inside the loop."""
    codec, _ = linear_codec()
    x, _ = target()
    with pytest.raises(ValueError, match=match):
        invert(codec, make(x), steps=3, method=method)


def test_a_resampling_filters_overshoot_is_kept_not_refused():
    codec, _ = linear_codec()
    x, _ = target()
    overshoot = x.clone()
    overshoot[..., 0, 0] = 1.08
    overshoot[..., 1, 1] = -0.05
    r = invert(codec, overshoot, steps=3, method="forward", lr=0.3)
    assert r.samples[0].psnr_best >= r.samples[0].psnr_initial


def test_an_array_or_a_pil_image_is_a_named_error():
    import numpy as np
    from PIL import Image

    codec, _ = linear_codec()
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    for image in (array, Image.fromarray(array)):
        with pytest.raises(TypeError, match=r"image must be a torch.Tensor .*load_image.*torch.from_numpy"):
            invert(codec, image, steps=3)


def test_sides_off_the_latent_cell_are_a_named_error_without_a_twin_too():
    """select="pixel" runs no twin: the size is checked at the run's first decode instead (core.evaluation)."""
    codec, _ = linear_codec()
    x, _ = target()
    with pytest.raises(ValueError, match=r"image is 8x7 px, but this VAE decodes its latent to 8x6 px"):
        invert(codec, x[..., :7, :], steps=3, method="anderson", select="pixel")
