"""Issue 12: the hybrid method's memory cap and gain, and the default's latent on hard cases.

Plain-torch tests use a small conv "autoencoder"; host tests use the shared VAEs in the paper's
protocol (z_gt = E(case), x = D(z_gt) in 8 bits) on the seeded hard cases of bench/cases.py."""
from __future__ import annotations

import importlib

import pytest
import torch

from bench import cases
from core import Codec, invert
from core.hybrid import backward_activation_mb


def _toy_codec(calls: list):
    """A 4-channel latent at 1/4 resolution; the decoder is a small nonlinear conv net, the encoder
    a mismatched approximate inverse (so the fixed point and the pixel optimum differ)."""
    torch.manual_seed(0)
    dec = torch.nn.Sequential(torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(4, 16, 3, padding=1),
                              torch.nn.Tanh(), torch.nn.Conv2d(16, 3, 3, padding=1)).requires_grad_(False)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, stride=4)).requires_grad_(False)

    def grad_decode():
        def decode(z):
            calls.append((tuple(z.shape), z.requires_grad))
            return torch.sigmoid(dec(z))
        return decode

    return Codec(encode=enc, decode=lambda z: torch.sigmoid(dec(z)), grad_decode=grad_decode)


ESTIMATE_PASSES = 2  # backward_activation_mb: two forward passes at small crops, no backward


def _differentiable_passes(calls):
    return sum(1 for _, needs_grad in calls if needs_grad)


def test_hybrid_under_a_cap_below_its_estimate_takes_no_gradient_step():
    calls = []
    codec = _toy_codec(calls)
    x = torch.rand(1, 3, 32, 32)
    r = invert(codec, x, method="hybrid", steps=30, memory_limit_mb=1e-4)
    assert r.extra["activation_estimate_mb"] > 1e-4
    assert r.extra["gradient_allowed"] is False and r.extra["switch_iteration"] == [None]
    assert _differentiable_passes(calls) == ESTIMATE_PASSES  # the estimate's, no gradient step


def test_hybrid_within_its_cap_switches_to_gradient_steps():
    calls = []
    codec = _toy_codec(calls)
    x = torch.rand(1, 3, 32, 32)
    r = invert(codec, x, method="hybrid", steps=40, memory_limit_mb=1e4, stall_steps=0)
    assert r.extra["gradient_allowed"] is True and r.extra["switch_iteration"][0] is not None
    assert _differentiable_passes(calls) > ESTIMATE_PASSES + 5


def test_the_hybrid_without_a_cap_checks_the_devices_free_memory_as_the_rival_does(monkeypatch):
    """memory_limit_mb 0 is the device's free memory (core.hybrid.free_memory_mb) for the hybrid too, not no cap:
    a library call on a GPU estimates its backward before the first gradient step, as the nodes' does."""
    import core.hybrid

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    free = invert(_toy_codec([]), x, method="hybrid", steps=2)
    assert free.extra["memory_limit_mb"] == pytest.approx(core.hybrid.free_memory_mb("cpu"), rel=0.2)
    assert free.extra["activation_estimate_mb"] > 0 and free.extra["gradient_allowed"] is True
    monkeypatch.setattr(core.hybrid, "free_memory_mb", lambda device: 1e-4)  # a device with no room to spare
    calls = []
    full = invert(_toy_codec(calls), x, method="hybrid", steps=30)
    assert full.extra["memory_limit_mb"] == 1e-4 and full.extra["gradient_allowed"] is False
    assert _differentiable_passes(calls) == ESTIMATE_PASSES  # the estimate's, no gradient step


def test_backward_rows_backpropagates_that_many_samples_at_a_time_for_the_same_latents():
    """backward_rows 1 keeps one sample's decoder activations at a time; the loss is a sum over samples, so each
    sample's gradient, and so its run, is the same up to the rounding of batched convolutions."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    whole_calls, row_calls = [], []
    whole = invert(_toy_codec(whole_calls), x, method="gradient", steps=8)
    rows = invert(_toy_codec(row_calls), x, method="gradient", steps=8, backward_rows=1)
    assert {shape[0] for shape, grad in whole_calls if grad} == {3}
    assert {shape[0] for shape, grad in row_calls if grad} == {1}
    assert _differentiable_passes(row_calls) == 3 * _differentiable_passes(whole_calls)
    assert torch.allclose(rows.latent, whole.latent, atol=1e-5)
    with pytest.raises(ValueError, match="backward_rows must be an integer >= 0"):
        invert(_toy_codec([]), x, method="gradient", backward_rows=-1)


def test_the_hybrids_memory_estimate_is_one_backwards_rows():
    """With backward_rows the hybrid checks its cap against the activations of that many samples, not the batch's."""
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    whole = invert(_toy_codec([]), x, method="hybrid", steps=2, memory_limit_mb=1e4).extra["activation_estimate_mb"]
    one = invert(_toy_codec([]), x, method="hybrid", steps=2, memory_limit_mb=1e4,
                 backward_rows=1).extra["activation_estimate_mb"]
    assert one == pytest.approx(whole / 4, rel=0.05)


def test_the_rival_backpropagates_its_sample_and_its_twin_one_after_the_other():
    """The default's rival runs each sample with its twin (a batch of two): one row per backward keeps one image's
    activations, as the gradient baseline on that image does -- not two (2.08x the baseline's live peak at 512 px
    when it backpropagated the pair, docs/measurements.md); its memory estimate is one row's."""
    calls = []
    codec = _toy_codec(calls)
    r = invert(codec, torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), steps=30)
    assert r.extra["rival"]["samples"] == [0] and not r.extra["rival"]["skipped"]
    rival_passes = [shape for shape, grad in calls if grad and shape[-1] == 8]  # the estimate's crops are smaller
    assert rival_passes and {shape[0] for shape in rival_passes} == {1}
    one_row = backward_activation_mb(codec.differentiable_decode(), r.latent)
    assert r.extra["rival"]["activation_estimate_mb"] == pytest.approx(one_row)


def test_hybrid_stays_gradient_free_at_the_noise_floor_and_restarts_from_an_early_iterate_below_it():
    """Sample 0 is in the decoder's range (8-bit rounded): Anderson gets its decode to the floor, so it
    never switches. Sample 1 (8-bit noise) stalls far below it: it restarts from the pixel-best of E(x) and the
    first EARLY_STEPS fixed-point iterates, so its iterate at the switch decodes exactly as that one did, and the
    diis steps that follow keep the fixed point's optimum."""
    from core.hybrid import EARLY_STEPS
    from tests.test_core_solver import linear_codec

    codec, dec = linear_codec()
    g = torch.Generator().manual_seed(1)
    in_range = dec(0.2 + 0.5 * torch.rand(1, 3, 4, 4, generator=g))
    x = (torch.cat([in_range, torch.rand(1, 3, 8, 8, generator=g)]).clamp(0, 1) * 255).round() / 255
    r = invert(codec, x, method="hybrid", steps=60, stall_steps=0)
    assert r.extra["at_noise_floor"] == [True, False]
    k = r.extra["switch_iteration"][1]
    assert r.extra["switch_iteration"][0] is None and k is not None
    early_best = r.trace_psnr[:EARLY_STEPS + 1, 1].max().item()
    assert k >= EARLY_STEPS + 1 and early_best > r.trace_psnr[0, 1] + 0.5  # not E(x): an early iterate gained
    assert r.trace_psnr[k, 1] == pytest.approx(early_best, abs=1e-4)
    assert r.samples[0].psnr_best > 80
    after, before = r.trace_psnr[k + 1:, 1].max(), r.trace_psnr[:k, 1].max()
    assert after >= before - 0.01  # at the fixed point's optimum (here it is the least-squares one: diis keeps it)


def test_hybrid_keeps_the_fixed_point_of_a_sample_still_closing_on_the_noise_floor():
    """The switch rule on three samples whose best PSNR gained less than MIN_GAIN_DB per iteration over the
    last STALL: 0.5 dB below the floor (with its margin) and still gaining 0.2 dB per iteration (projected
    there in 2.5 iterations) keeps its fixed point; 15 dB below it, or not gaining, restarts from E(x)."""
    from core import hybrid as hy
    from core.twin import noise_floor_psnr

    z0 = torch.zeros(3, 4, 2, 2)
    image = torch.full((3, 3, 16, 16), 128 / 255)
    h = hy.Hybrid(z0, torch.ones(3, 1, 1, 1), rho=0.5, memory=3, floor_psnr=noise_floor_psnr(image),
                  encoded=torch.full_like(z0, 7.0))
    floor = h.floor_psnr
    gain = 0.2 * hy.STALL  # over the ring's span: below STALL x MIN_GAIN_DB, so each counts as stalled
    assert gain < hy.STALL * hy.MIN_GAIN_DB and 0.5 * hy.STALL / gain < hy.NEAR_FLOOR_ITERATIONS
    h.k = hy.STALL + 1
    now = floor - torch.tensor([0.5, 15.0, 0.5])
    h.best_db[h.k % (hy.STALL + 1)] = now
    h.best_db[(h.k + 1) % (hy.STALL + 1)] = now - torch.tensor([gain, gain, 0.0])
    z = torch.ones_like(z0)
    h._switch(z, torch.ones(3))
    assert h.switched.tolist() == [False, True, True] and h.settled.tolist() == [False, False, False]
    assert (z[0] == 1).all() and (z[1:] == 7).all()  # the restarted samples sit at E(x): no iterate was recorded


def test_activation_estimate_scales_with_area():
    dec = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv2d(32, 3, 3, padding=1)).requires_grad_(False)
    small, large = (backward_activation_mb(dec, torch.zeros(1, 4, n, n)) for n in (8, 16))
    assert large == pytest.approx(4 * small, rel=0.05)


# --- on the real host, shared VAEs --------------------------------------------------------------

SIZE, STEPS = 32, 30


@pytest.fixture(scope="module")
def pack(host):
    name = host.pack.__name__
    return importlib.import_module(name + ".nodes.adapter"), importlib.import_module(name + ".core")


def _protocol(adapter, vae, case, size=SIZE):
    codec = adapter.vae_codec(vae, "fp32", (1, 3, size, size))
    with torch.inference_mode():
        z_gt = codec.encode(cases.make(case, size)).float()
        x = (codec.decode(z_gt).float().clamp(0, 1) * 255).round() / 255
        z_enc = codec.encode(x).float()
    return codec, x.clone(), z_gt.clone(), z_enc.clone()


def _nmse_db(z, ref):
    return float(10 * torch.log10(((z - ref) ** 2).sum() / (ref ** 2).sum()))


@pytest.mark.parametrize("vae_name,case", [(v, c) for v in ("kl_small", "taef2")
                                           for c in ("flat_objects", "flat_noise", "stars", "texture")])
def test_default_is_never_worse_than_the_encoder_in_the_latent(vae_name, case, request, pack):
    adapter, core = pack
    codec, x, z_gt, z_enc = _protocol(adapter, request.getfixturevalue(vae_name), case)
    r = core.invert(codec, x, steps=STEPS)
    assert _nmse_db(r.latent, z_gt) <= _nmse_db(z_enc, z_gt)
    assert r.samples[0].psnr_best >= r.samples[0].psnr_initial  # and never worse in pixels


@pytest.mark.slow
@pytest.mark.parametrize("case,precision", [("flat_objects", "bf16"), ("flat_noise", "fp16")])
def test_in_16_bit_the_default_is_never_worse_than_the_encoder_in_the_latent(precision, case, taef2, pack):
    """A 16-bit codec runs the twin too, with the lower of the 8-bit and the codec's own floor
    (core.twin.precision_floor_psnr). The best pixel iterate (what 16-bit returned before) is worse than
    E(x) in the latent on these TAEF2 cases (measured at 32 px: -5.0 vs -11.1 dB, -4.8 vs -5.2 dB in bf16).
    Each case in one of the two precisions (each of the four pairs ran ~100 s in a CI worker; all four passed
    through session 26)."""
    adapter, core = pack
    _, x, z_gt, _ = _protocol(adapter, taef2, case)
    codec = adapter.vae_codec(taef2, precision, (1, 3, SIZE, SIZE))
    with torch.inference_mode():
        z_enc = codec.encode(x.to(codec.dtype)).float()
    r = core.invert(codec, x, steps=STEPS)
    pixel = core.invert(codec, x, steps=STEPS, select="pixel")
    assert _nmse_db(pixel.latent, z_gt) > _nmse_db(z_enc, z_gt)  # the case is hard in this precision
    assert r.samples[0].selection == "twin" and _nmse_db(r.latent, z_gt) <= _nmse_db(z_enc, z_gt)
    assert r.samples[0].psnr_best >= r.samples[0].psnr_initial


@pytest.mark.parametrize("case", ["flat_objects", "flat_noise"])
def test_on_taef2_the_pixel_best_iterate_drifts_and_the_twin_pick_does_not(case, taef2, pack):
    """The mechanism (docs/convergence.md): the best pixel iterate is worse than E(x) in the latent by
    over 1 dB; the default returns the twin's pick, which is not, and says so in its summary."""
    adapter, core = pack
    codec, x, z_gt, z_enc = _protocol(adapter, taef2, case)
    pixel = core.invert(codec, x, steps=STEPS, select="pixel")
    default = core.invert(codec, x, steps=STEPS, rival="")  # the fixed point's own pick (the rival: below)
    assert _nmse_db(pixel.latent, z_gt) > _nmse_db(z_enc, z_gt) + 1.0
    assert default.samples[0].selection == "twin" and "twin problem's pick" in default.summary()
    assert default.samples[0].best_iteration < pixel.samples[0].best_iteration
    assert _nmse_db(default.latent, z_gt) < _nmse_db(pixel.latent, z_gt) - 1.0


@pytest.mark.slow
def test_the_rival_fixes_the_kl_f8_case_where_every_fixed_point_method_is_worse_than_the_encoder(kl_small, pack):
    """kl-f8 texture at 64 px (docs/convergence.md, "The rival"): the fixed point converges to a latent whose
    round trip matches E(x) but whose decode does not (the latent NMSE climbs to 0 dB while the residual falls);
    its twin converges, so the twin's pick is worse than E(x). That twin did not stand for the run (core.twin's
    twin_faithful: the run settled with a fraction of its twin's pixel gain); the diis rival's did, and the default
    returns the rival's pick, closer to the truth than E(x)."""
    adapter, core = pack
    codec, x, z_gt, z_enc = _protocol(adapter, kl_small, "texture", size=64)
    free = core.invert(codec, x, rival="")
    default = core.invert(codec, x)
    assert _nmse_db(free.latent, z_gt) > _nmse_db(z_enc, z_gt) + 3  # the failure the rival is for
    assert free.extra["twin"][0]["faithful"] is False and default.extra["twin"][0]["faithful"] is True
    assert default.extra["rival"]["chosen"] == [0] and "rival" in default.summary()
    assert _nmse_db(default.latent, z_gt) < _nmse_db(z_enc, z_gt) - 2
    s = default.samples[0]
    assert s.psnr_best > free.samples[0].psnr_best + 10 and default.trace_psnr[s.best_iteration, 0] == s.psnr_best


def test_a_short_rival_from_the_pixel_best_that_picks_its_start_is_judged_along_the_first_runs_path(kl_small, pack):
    """kl-f8 texture at 64 px, 30 steps (docs/convergence.md, session 28): the second rival starts from the first run's
    pixel-best (worse than E(x) in the latent), its twin from the twin's own (about -41 dB: nothing left to gain), so
    its pick is its start. Its run was still gaining, so its twin went unjudged, and on the twins' errors that start
    replaced the early rival's pick: the first run's pixel-best, -10.0 dB against E(x)'s -15.6. A pick at the start is
    judged along the path that led there (core.twin.twin_faithful): 8.1 of its twin's 25.3 dB, not stood for, so the
    early rival's pick stands, no worse than E(x) in the latent and far better in pixels."""
    adapter, core = pack
    codec, x, z_gt, z_enc = _protocol(adapter, kl_small, "texture", size=64)
    free = core.invert(codec, x, steps=STEPS, rival="")
    default = core.invert(codec, x, steps=STEPS)
    rival = default.extra["rival"]
    assert _nmse_db(free.latent, z_gt) > _nmse_db(z_enc, z_gt) + 3  # the first run's pick (its pixel-best)
    assert rival["from_pixel_best"]["samples"] == [0] and rival["from_pixel_best"]["chosen"] == []
    assert rival["chosen"] == [0] and default.extra["twin"][0]["faithful"] is True  # the early rival's pick
    assert _nmse_db(default.latent, z_gt) <= _nmse_db(z_enc, z_gt)
    assert default.samples[0].psnr_best > free.samples[0].psnr_best + 10


def test_a_short_first_run_that_settled_over_its_second_half_is_judged(kl_small, pack):
    """kl-f8 texture at 64 px, 20 steps (docs/convergence.md, session 29): Anderson's pixel error is flat after
    iteration 10 (+0.12 dB) while its twin goes on to the noise floor; its pick gained 7.1 of its twin's 25.2 dB and is
    -10.0 dB from the truth, worse than E(x). A run of 20 steps never had the 20 flat iterations `twin_faithful`
    waited for, so its twin went unjudged and its pick beat the rivals on the twins' errors. A run shorter than twice
    that settles over its second half: judged, not stood for, the early rival's pick stands, no worse than E(x)."""
    adapter, core = pack
    codec, x, z_gt, z_enc = _protocol(adapter, kl_small, "texture", size=64)
    free = core.invert(codec, x, steps=20, rival="")
    default = core.invert(codec, x, steps=20)
    assert _nmse_db(free.latent, z_gt) > _nmse_db(z_enc, z_gt) + 3  # the first run's pick
    assert free.extra["twin"][0]["faithful"] is False
    assert default.extra["rival"]["chosen"] == [0] and default.extra["twin"][0]["faithful"] is True
    assert _nmse_db(default.latent, z_gt) <= _nmse_db(z_enc, z_gt)
    assert default.samples[0].psnr_best >= default.samples[0].psnr_initial


@pytest.mark.slow
def test_where_the_twin_turned_unstable_early_the_rival_from_the_pixel_best_returns_the_closer_latent(kl_small, pack):
    """kl-f8 flat_objects at 128 px (docs/convergence.md, "The rival from the pixel-best"): Anderson turns unstable on
    the twin after 4 iterations, so the twin picks iteration 4 (-13.9 dB) while the real run kept closing in on the
    truth until its pixel-best (-17.9 dB, as close as the best plain fixed-point method gets); the first rival reaches
    the noise floor in pixels but stays near E(x) in the latent (-12.9 dB). The rival run again from the pixel-best,
    its twin from the twin's, wins on the twins' errors, its twin judged along the whole path from E(x) (0.55 of its
    twin's gain there: stood for)."""
    adapter, core = pack
    codec, x, z_gt, z_enc = _protocol(adapter, kl_small, "flat_objects", size=128)
    default = core.invert(codec, x)
    again = default.extra["rival"]["from_pixel_best"]
    assert again["samples"] == [0] and again["chosen"] == [0] and default.extra["twin"][0]["faithful"] is True
    assert _nmse_db(default.latent, z_gt) < _nmse_db(z_enc, z_gt) - 4
    assert "rival run again from the first run's pixel-best iterate on image(s) 1" in default.summary()


def test_the_rival_respects_the_memory_cap(taef2, pack):
    adapter, core = pack
    codec, x, _, _ = _protocol(adapter, taef2, "flat_noise")
    capped = core.invert(codec, x, steps=STEPS, memory_limit_mb=0.01)
    free = core.invert(codec, x, steps=STEPS, rival="")
    rival = capped.extra["rival"]
    assert rival["skipped"].startswith("memory") and rival["activation_estimate_mb"] > 0.01
    assert torch.equal(capped.latent, free.latent) and "rival not run: memory" in capped.summary()


def test_under_a_cap_only_recomputing_fits_the_rival_recomputes_the_real_decoders_blocks(kl_small, pack):
    """kl-f8 texture at 64 px, where the rival's pick is returned (at 30 steps as at 100): capped between one image's
    kept activations and those with the ComfyUI decoder's blocks recomputed (core.checkpointing, found by structure in
    ComfyUI's own classes), the rival runs recomputing instead of being skipped, and returns the latent it returns with
    room."""
    adapter, core = pack
    hybrid = importlib.import_module(core.__name__ + ".hybrid")
    codec, x, _, _ = _protocol(adapter, kl_small, "texture", size=64)
    decode, z = codec.differentiable_decode(), torch.zeros(1, 4, 8, 8)
    kept, recomputed = hybrid.backward_activation_mb(decode, z), hybrid.backward_activation_mb(decode, z, True)
    assert recomputed < 0.8 * kept
    roomy = core.invert(codec, x, steps=STEPS)
    capped = core.invert(codec, x, steps=STEPS, memory_limit_mb=(kept + recomputed) / 2)
    assert roomy.extra["rival"]["chosen"] == capped.extra["rival"]["chosen"] == [0]
    assert capped.extra["rival"]["recomputed_blocks"] is True and roomy.extra["rival"]["recomputed_blocks"] is False
    assert "decoder's blocks recomputed" in capped.summary()
    assert torch.allclose(capped.latent, roomy.latent, atol=1e-4)


def test_without_a_cap_the_rival_keeps_to_the_devices_free_memory(taef2, pack, monkeypatch):
    """The rival is part of the default, so memory_limit_mb 0 does not mean unbounded for it: a full SD decoder's
    backward keeps ~6 GiB of activations at 512 px (bench.memory_live), ~4x that at 1024 px; above the device's free
    memory the run stays gradient-free instead of exhausting the host."""
    adapter, core = pack
    hybrid = importlib.import_module(core.__name__ + ".hybrid")  # where memory_cap_mb reads the free memory
    assert hybrid.free_memory_mb("cpu") > 0  # this host's available memory is known (Linux MemAvailable / psutil)
    monkeypatch.setattr(hybrid, "free_memory_mb", lambda device: 0.01)
    codec, x, _, _ = _protocol(adapter, taef2, "flat_noise")
    short = core.invert(codec, x, steps=STEPS)
    # checkpoint auto: not even with the decoder's blocks recomputed
    assert short.extra["rival"]["skipped"] == "memory (free 0 MiB, its decoder's blocks recomputed)"
    assert short.extra["rival"]["recomputed_blocks"] is True and "rival not run: memory" in short.summary()
    assert torch.equal(short.latent, core.invert(codec, x, steps=STEPS, rival="").latent)


def test_the_rival_stops_once_it_cannot_win_and_returns_what_the_whole_race_would(kl_small, pack, monkeypatch):
    """A real photo with kl-f8 (what a node gets; docs/convergence.md, "The rival's race"): the fixed point's twin gets
    to about -36 dB, the diis rival's creeps from -19 dB and cannot catch up, and neither stood for its run, so
    rival_wins keeps the fixed point's pick. The race stops the rival once that is certain (core.twin.CATCH_UP); with
    the race off the rival runs every step and the default returns the same latent."""
    from tests.support.images import load_photo
    from tests.support.paths import image_paths

    adapter, core = pack
    twin = importlib.import_module(core.__name__ + ".twin")
    photo = {p.stem: p for p in image_paths()}["astronaut"]
    x = load_photo(photo, 64).permute(0, 3, 1, 2).contiguous()
    codec = adapter.vae_codec(kl_small, "fp32", (1, 3, 64, 64))
    raced = core.invert(codec, x)
    monkeypatch.setattr(twin, "CATCH_UP", float("inf"))  # the rival's twin could catch up at any rate: no early stop
    whole = core.invert(codec, x)
    assert raced.extra["rival"]["samples"] == whole.extra["rival"]["samples"] == [0]
    assert raced.extra["rival"]["chosen"] == whole.extra["rival"]["chosen"] == []
    (i, stopped_at), = raced.extra["rival"]["outmatched"]
    assert i == 0 and stopped_at < 50 and whole.extra["rival"]["outmatched"] == []
    assert "could not win" in raced.summary()
    assert torch.equal(raced.latent, whole.latent) and raced.samples == whole.samples


def test_the_pace_skips_only_a_second_rival_that_would_have_lost(kl_small, pack, monkeypatch):
    """kl-f8 flat_objects at 64 px (docs/convergence.md, "The rival's pace"): the first run's pixel-best is not the
    early rival's start, but a diis run from it, gaining on its twin at the early rival's pace for all its steps, could
    not get within TOO_CLOSE_DB of the standing pick's twin, so it is not run (core.twin.off_pace). With the race and
    the pace off (bench.measure.race_off) it runs every step, loses, and the default returns the same latent."""
    adapter, core = pack
    twin = importlib.import_module(core.__name__ + ".twin")
    codec, x, _, _ = _protocol(adapter, kl_small, "flat_objects", size=64)
    paced = core.invert(codec, x)
    again = paced.extra["rival"]["from_pixel_best"]
    assert again["off_pace"] == [0] and again["samples"] == [] and paced.extra["twin"][0]["faithful"] is True
    assert "at the first rival's pace its twin could not have got closer" in paced.summary()
    monkeypatch.setattr(twin, "CATCH_UP", float("inf"))
    monkeypatch.setattr(twin, "TOO_CLOSE_DB", float("inf"))
    whole = core.invert(codec, x)
    again = whole.extra["rival"]["from_pixel_best"]
    assert again["off_pace"] == [] and again["samples"] == [0] and again["chosen"] == []
    assert whole.extra["rival"]["chosen"] == paced.extra["rival"]["chosen"]
    assert torch.equal(paced.latent, whole.latent)


def test_the_default_never_returns_an_iterate_past_the_pixel_best(kl_small, pack):
    """kl-f8 stars at 64 px (docs/convergence.md, "Never past the pixel-best"): the twin picks iteration 31, but the
    decode was best at 22 and only got worse after it; the pixel-best is 1.5 dB closer to the true latent (-21.20
    vs -19.73 dB), and the default returns it (the rival, outmatched, does not win)."""
    adapter, core = pack
    codec, x, z_gt, z_enc = _protocol(adapter, kl_small, "stars", size=64)
    default = core.invert(codec, x)
    twin = core.invert(codec, x, select="twin", rival="")
    pixel = core.invert(codec, x, select="pixel")
    assert pixel.samples[0].best_iteration < twin.samples[0].best_iteration, "the case must have the pick after"
    assert default.extra["twin"][0]["why"] == "pixel best first" and default.extra["rival"]["chosen"] == []
    # the same iterate; the pixel run has no twin rows, and a batch of two convolves with other rounding, which 22
    # iterations amplify: run alone (2 threads) the two latents are 1.9e-4 apart relative to their norm, 0.003 at most
    # on a scale of 6 (an absolute 1e-3 held only in some test orders, on the old code as on the new)
    assert default.samples[0].best_iteration == pixel.samples[0].best_iteration
    assert (default.latent - pixel.latent).norm() < 1e-3 * pixel.latent.norm()
    assert _nmse_db(default.latent, z_gt) < _nmse_db(twin.latent, z_gt) - 1.0 < _nmse_db(z_enc, z_gt)


def test_where_the_decode_reaches_the_noise_floor_the_first_iterate_at_the_noise_level_is_returned(kl_small, pack):
    """kl-f8 explains the 8-bit image to its rounding noise: auto returns the first iterate whose decode came
    within FLOOR_NEAR_DB of the noise floor (the discrepancy principle), not the twin's pick; later iterates
    fit the rounding noise (bench.floor_rules: closer to the truth on 6 of 14 floor cells, a tie here)."""
    adapter, core = pack
    twin = importlib.import_module(core.__name__ + ".twin")
    codec, x, z_gt, z_enc = _protocol(adapter, kl_small, "texture")
    # floor_steps 0: the rule itself, without core.polish going on from its iterate (test_past_the_noise_level_...)
    auto = core.invert(codec, x, steps=STEPS, floor_steps=0)
    pixel = core.invert(codec, x, steps=STEPS, select="pixel")
    s, floor = auto.samples[0], float(twin.noise_floor_psnr(x)[0])
    trace = auto.trace_psnr[:, 0].nan_to_num(-1)
    first = int((trace >= floor - twin.FLOOR_NEAR_DB).nonzero()[0])
    assert s.selection == "noise level" and auto.extra["twin"][0]["why"] == "noise level"
    assert s.best_iteration == first < pixel.samples[0].best_iteration
    assert s.psnr_best == pytest.approx(float(trace[first]))
    assert _nmse_db(auto.latent, z_gt) < _nmse_db(z_enc, z_gt)
    assert "noise level" in auto.summary()


def test_hybrid_beats_the_gradient_free_default_in_pixels_on_a_taef2_hard_case(taef2, pack):
    adapter, core = pack
    codec, x, _, _ = _protocol(adapter, taef2, "flat_objects")
    default = core.invert(codec, x, steps=STEPS).samples[0]
    hybrid = core.invert(codec, x, method="hybrid", steps=STEPS)
    assert hybrid.extra["switch_iteration"][0] is not None
    assert hybrid.samples[0].psnr_best > default.psnr_best + 1.0


def test_hybrid_in_bf16_stays_gradient_free_at_the_codecs_own_noise_floor(kl_small, pack):
    """In bf16 kl-f8's decode stops below the 8-bit floor, at the codec's own (core.twin.decode_floor_psnr): the
    hybrid stays gradient-free there, as the default's selection counts it at the floor."""
    adapter, core = pack
    _, x, _, _ = _protocol(adapter, kl_small, "stars")
    codec = adapter.vae_codec(kl_small, "bf16", (1, 3, SIZE, SIZE))
    r = core.invert(codec, x, method="hybrid", steps=STEPS)
    assert r.samples[0].psnr_best < core.twin.noise_floor_psnr(x).item() - core.twin.FLOOR_MARGIN_DB  # 8-bit: below
    assert r.extra["at_noise_floor"] == [True] and r.extra["switch_iteration"] == [None]


def test_hybrid_on_kl_f8_finishes_gradient_free_at_the_noise_floor(kl_small, pack):
    """A jointly trained VAE in the paper protocol: Anderson takes the decode to the 8-bit noise floor,
    so the hybrid never pays for a gradient step there, and its result is the fixed point's."""
    adapter, core = pack
    codec, x, _, _ = _protocol(adapter, kl_small, "flat_noise")
    r = core.invert(codec, x, method="hybrid", steps=STEPS)
    assert r.extra["at_noise_floor"] == [True] and r.extra["switch_iteration"] == [None]
    free = core.invert(codec, x, method="anderson", steps=STEPS, select="pixel")
    assert r.samples[0].psnr_best == pytest.approx(free.samples[0].psnr_best, abs=0.05)


def test_past_the_noise_level_the_twin_picks_how_far_the_damped_forward_steps_go(kl_small, pack):
    """kl-f8 rocket (a shared photo) at 64 px: the decode reaches the 8-bit noise floor and the first iterate at the
    noise level is -41.44 dB from the true latent; km steps from it (core.polish), its twin's from its own, come closer
    and then drift off, and the twin's pick is 1.2 dB closer (-42.60 dB; docs/convergence.md, "Past the noise
    level"), its decode no worse. With floor_steps 0 the noise-level iterate stands."""
    from bench.measure import paper_pair, photo_bchw

    adapter, core = pack
    codec = adapter.vae_codec(kl_small, "fp32", (1, 3, 64, 64))
    x, z_gt = (t.clone() for t in paper_pair(codec, photo_bchw("rocket", 64)))
    polished, stopped = core.invert(codec, x), core.invert(codec, x, floor_steps=0)
    assert stopped.samples[0].selection == "noise level"
    assert polished.samples[0].selection == "past noise level"
    assert polished.extra["twin"][0]["why"] == "past noise level" and polished.extra["polish"]["moved"] == [0]
    assert polished.samples[0].stop_reason == "twin_settled"  # not all 100 steps: the twin's error turned up
    assert polished.samples[0].best_iteration > stopped.samples[0].best_iteration
    assert polished.samples[0].psnr_best >= stopped.samples[0].psnr_best
    assert _nmse_db(polished.latent, z_gt) < _nmse_db(stopped.latent, z_gt) - 0.5
    assert "damped forward steps" in polished.summary()
