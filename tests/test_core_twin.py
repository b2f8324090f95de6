"""The twin problem that picks the returned iterate (core.twin), on plain-torch codecs."""
from __future__ import annotations

import math

import pytest
import torch

from core import Codec, invert
from core.twin import SETTLE_STEPS, TOO_CLOSE_DB, TwinTracker, is_8bit, noise_floor_psnr, twin_faithful, twin_of
from test_core_solver import linear_codec, nan_after, target


def _eight_bit(x):
    return (x.clamp(0, 1) * 255).round() / 255


def test_the_twin_is_the_papers_protocol_on_the_image_itself():
    codec, _ = linear_codec()
    x, _ = target()
    for image, rounded in ((_eight_bit(x), True), (x, False)):
        x_t, truth = twin_of(codec, image, codec.encode(image))
        assert torch.equal(truth, codec.encode(image))
        assert bool(is_8bit(x_t).all()) is rounded
        if not rounded:
            assert torch.equal(x_t, codec.decode(truth))


def test_noise_floor_counts_only_pixels_rounding_can_move():
    half_black = torch.full((1, 3, 4, 4), 100 / 255)
    half_black[..., :2, :] = 0.0  # possibly clipped: rounding leaves them exact
    full, half = noise_floor_psnr(torch.full((1, 3, 4, 4), 100 / 255)), noise_floor_psnr(half_black)
    assert float(half - full) == pytest.approx(3.01, abs=0.01)  # half the noisy pixels


def test_the_twin_rows_are_invisible_to_the_caller():
    codec, _ = linear_codec()
    x, _ = target(batch=2)
    seen = []
    r = invert(codec, _eight_bit(x), method="forward", steps=12, select="twin",
               callback=lambda k, n, info: seen.append(len(info["psnr"])))
    assert len(r.samples) == 2 and r.latent.shape[0] == 2 and r.trace_psnr.shape[1] == 2
    assert set(seen) == {2} and len(r.extra["twin"]) == 2


def test_on_a_solvable_float_problem_the_twin_lets_the_run_converge():
    """x = D(z) exactly, not 8-bit (no noise floor): auto uses the twin, whose own problem is solvable
    too, so its lowest latent error comes once both reached fp32's floor: the exact latent is returned. (The default's
    rival may get there first: a decode with no error at all, PSNR inf, counts as at the floor, "noise level".)"""
    codec, _ = linear_codec()
    x, z_true = target()
    r = invert(codec, x, method="forward", lr=0.8, steps=200, stall_steps=0, rival="")
    assert r.samples[0].selection == "twin" and r.samples[0].psnr_best > 100
    assert torch.allclose(r.latent, z_true, atol=1e-4)
    r = invert(codec, x, method="forward", lr=0.8, steps=200, stall_steps=0)
    assert r.samples[0].selection in ("twin", "noise level") and r.samples[0].psnr_best > 100
    assert torch.allclose(r.latent, z_true, atol=1e-4)


def test_the_twin_never_returns_an_iterate_that_decodes_to_nan():
    codec, dec = linear_codec()
    x, _ = target()
    r = invert(Codec(codec.encode, nan_after(dec, 4)), x, method="adam", steps=50, select="twin")
    s = r.samples[0]
    assert s.stop_reason == "diverged" and torch.isfinite(r.latent).all()
    assert s.psnr_best >= s.psnr_initial  # a finite PSNR, never below the encoder's


def test_a_twin_pick_that_decodes_worse_than_the_encoder_returns_the_encoder():
    torch.manual_seed(0)
    dec = torch.nn.Sequential(torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(4, 16, 3, padding=1),
                              torch.nn.Tanh(), torch.nn.Conv2d(16, 3, 3, padding=1)).requires_grad_(False)
    enc = torch.nn.Conv2d(3, 4, 4, stride=4).requires_grad_(False)
    codec = Codec(enc, lambda z: torch.sigmoid(dec(z)))
    x = _eight_bit(torch.rand(6, 3, 32, 32))
    r = invert(codec, x, method="anderson", steps=30, select="twin")
    selections = [s.selection for s in r.samples]
    assert "encoder" in selections  # not vacuous: this mismatched pair has such samples
    for i, s in enumerate(r.samples):
        assert s.psnr_best >= s.psnr_initial
        if s.selection == "encoder":
            assert torch.equal(r.latent[i], enc(x[i:i + 1])[0]) and s.best_iteration == 0


def _saddle_codec(mix):
    """D(z) = M z per pixel (2x nearest upsampling) about mid-grey, E = 0.9 x 2x average pooling about it:
    the round trip is 0.9 M, whose negative eigenvalues every fixed-point step expands along."""
    up, pool = torch.nn.Upsample(scale_factor=2), torch.nn.AvgPool2d(2)
    return Codec(lambda x: 0.9 * pool(x - 0.5), lambda z: up(torch.einsum("ij,bjhw->bihw", mix, z)) + 0.5)


SADDLE = torch.tensor([[1.0, 0.2, 0.1], [0.2, 0.9, 0.2], [0.1, 0.2, -0.3]])  # one eigenvalue ~ -0.33


def test_arnoldi_finds_the_round_trips_expanding_direction_and_the_step_is_projected_off_it():
    from core.unstable import project_off, unstable_directions

    codec = _saddle_codec(SADDLE)
    x, _ = target()
    z0 = codec.encode(x)

    def roundtrip(z):
        return codec.encode(codec.decode(z))
    v, lowest = unstable_directions(roundtrip, z0, z0 * 0.5, 10)
    expanding = 0.9 * torch.linalg.eigvalsh(SADDLE)[0].item()  # one per latent pixel: a 16-dim eigenspace
    assert v.shape[1] >= 1 and lowest[0] == pytest.approx(expanding, abs=1e-3)
    for row in v[0]:  # each direction found lies in that eigenspace: J v = lambda v
        jv = (roundtrip(row.view_as(z0)) - roundtrip(torch.zeros_like(z0))).reshape(-1)
        assert (jv - expanding * row).norm() < 1e-3
    g = torch.randn_like(z0)
    assert (v[0] @ project_off(g.clone(), v).reshape(-1)).abs().max() < 1e-5
    pd, _ = linear_codec()  # a positive definite round trip: nothing to project off
    v, _ = unstable_directions(lambda z: pd.encode(pd.decode(z)), pd.encode(x), pd.encode(x) * 0.5, 10)
    assert v.shape[1] == 0


def test_a_twin_decided_sample_is_restarted_off_the_expanding_directions():
    """The forward step expands along the round trip's negative eigenvalue, so the twin picks an early iterate;
    restarted with the steps projected off that direction, the iteration keeps E(x)'s error there (large: this
    encoder is far from the decoder's inverse) and removes the rest of it."""
    codec = _saddle_codec(SADDLE)
    g = torch.Generator().manual_seed(1)
    z_true = 0.2 * torch.rand(1, 3, 4, 4, generator=g) - 0.1
    x = _eight_bit(codec.decode(z_true))

    def err(z):
        return float((z - z_true).square().sum() / z_true.square().sum())
    plain = invert(codec, x, method="forward", lr=0.5, steps=120)  # the default: no restart
    r = invert(codec, x, method="forward", lr=0.5, steps=120, unstable_steps=20)
    assert r.extra["unstable"][0]["restarted"] and r.extra["twin"][0]["restart"]
    assert err(r.latent) < err(plain.latent) <= err(codec.encode(x))  # plain: the twin picked E(x) itself
    s = r.samples[0]
    assert s.psnr_best >= s.psnr_initial and r.trace_psnr.shape[0] > plain.trace_psnr.shape[0]
    assert r.trace_psnr[s.best_iteration, 0].item() == pytest.approx(s.psnr_best)


def test_without_expanding_directions_the_restart_changes_nothing():
    codec, _ = linear_codec()
    x, _ = target(batch=2)
    x = _eight_bit(x)
    r = invert(codec, x, method="forward", steps=30, unstable_steps=20)
    plain = invert(codec, x, method="forward", steps=30)
    assert not any(u["restarted"] for u in r.extra.get("unstable", [{"restarted": False}]))
    assert torch.equal(r.latent, plain.latent)  # traces too, NaN where a sample had stopped (core.polish's merge)
    torch.testing.assert_close(r.trace_psnr, plain.trace_psnr, rtol=0, atol=0, equal_nan=True)


def _race(twin_db: list[float], real_psnr: list[float], twin_psnr: list[float], to_beat: float, first_faithful: bool,
          origin: torch.Tensor | None = None, pace: float | None = None):
    """A race tracker fed a rival's run: the twin's latent error (dB) and both rows' PSNR per iteration; returns
    the first iteration at which outmatched() said stop (None: never)."""
    truth = torch.ones(1, 4, 2, 2)
    tracker = TwinTracker(truth, torch.tensor([math.inf]))
    tracker.race(torch.tensor([to_beat]), torch.tensor([first_faithful]), steps=len(twin_db) - 1,
                 pace_db=None if pace is None else torch.tensor([pace]))
    tracker.origin_psnr = origin
    active = torch.ones(2, dtype=torch.bool)
    mse = 10 ** (-torch.tensor([real_psnr, twin_psnr], dtype=torch.float64).T / 10)  # (steps + 1, 2): the trace
    for k, db in enumerate(twin_db):
        z = torch.cat([truth, truth * (1 + 10 ** (db / 20))])  # the twin row's relative error is db
        tracker.observe(k, z, active, mse[k].float())
        if tracker.outmatched(k, mse[:k + 1].float()).item():
            return k
    return None


def test_a_rival_whose_twin_cannot_catch_up_with_the_first_runs_is_stopped_once_its_rate_is_known():
    """kl-f8 on a real photo: the first run's twin reached -36 dB, the diis rival's creeps from -19 dB; at three
    times its rate it would not get there in the steps left, so rival_wins could not prefer it."""
    creeping = [-19.0 - 0.05 * k for k in range(101)]
    gaining = [20.0 + 0.2 * k for k in range(101)]  # its decode still improving: a faithful rival
    assert _race(creeping, gaining, gaining, to_beat=-36.0, first_faithful=True) == SETTLE_STEPS
    # a twin falling fast enough could still win: raced to the end
    assert _race([-19.0 - 0.3 * k for k in range(101)], gaining, gaining, to_beat=-36.0, first_faithful=True) is None
    # the first run's twin did not stand for it: a faithful rival wins whatever its error, so it runs on
    assert _race(creeping, gaining, gaining, to_beat=-36.0, first_faithful=False) is None


def test_a_rival_on_a_plateau_within_too_close_db_of_the_first_runs_twin_runs_on():
    """TAEF2 rocket at 64 px (session 15): the rival's twin sat flat 0.35 dB behind for 35 iterations, then won by
    0.13 dB. A rate of 0 projects no catching up, but within TOO_CLOSE_DB the race is too close to call."""
    gaining = [20.0 + 0.2 * k for k in range(101)]
    plateau = [-15.68] * 56 + [-15.68 - 0.011 * k for k in range(1, 46)]  # -16.16 at the end
    assert _race(plateau, gaining, gaining, to_beat=-16.03, first_faithful=True) is None
    farther = [-16.03 + TOO_CLOSE_DB + 0.2] * 101  # the same plateau, beyond the margin: stopped once its rate is known
    assert _race(farther, gaining, gaining, to_beat=-16.03, first_faithful=True) == SETTLE_STEPS


def test_against_an_unfaithful_first_run_only_a_rival_that_would_be_judged_unfaithful_too_is_stopped():
    creeping = [-19.0 - 0.05 * k for k in range(101)]
    settled = [20.0 + min(k, 5) * 0.1 for k in range(101)]  # gained 0.5 dB, then flat
    twin_gaining = [30.0 + 0.3 * k for k in range(101)]  # its twin gained 6 dB by iteration 20 and keeps on
    k = _race(creeping, settled, twin_gaining, to_beat=-36.0, first_faithful=False)
    assert k == SETTLE_STEPS
    # what twin_faithful says of that run had it ended there: unfaithful, so rival_wins keeps the first run's pick
    trace = torch.tensor([settled[:k + 1], twin_gaining[:k + 1]]).T
    picks = [k]  # the creeping twin's best is its newest iterate
    assert twin_faithful(trace, [type("S", (), {"iterations": k})(), None], picks) == [False]


def test_a_rival_from_the_first_runs_pixel_best_is_judged_along_the_path_its_start_came_by():
    """kl-f8 texture at 64 px (session 17): the first run's pixel-best gained 8.1 dB over E(x) (32.94 -> 41.06)
    where its twin's gained 25.3 (33.56 -> 58.81); a rival from there whose twin's pick is its start gained 0 of 0,
    which twin_faithful alone cannot judge. Counted from E(x) and E(x_t) it is the first run's 0.32: not stood for."""
    real = [41.06] * 30  # the rival's real decode at its pick (its start); settled by the window's end
    twin = [58.81] + [58.0] * 29  # its twin only got worse after its start: the pick is iterate 0
    trace = torch.tensor([real, twin]).T
    stats = [type("S", (), {"iterations": 29})(), None]
    assert twin_faithful(trace, stats, [0]) == [True]
    assert twin_faithful(trace, stats, [0], origin=torch.tensor([32.94, 33.56])) == [False]
    # kl-f8 flat_objects at 128 px: 33.79 -> 43.70 against the twin's 36.19 -> 54.17, 0.55: stood for
    flat = torch.tensor([[43.70] * 30, [54.17] + [50.0] * 29]).T
    assert twin_faithful(flat, stats, [0], origin=torch.tensor([33.79, 36.19])) == [True]


def test_the_race_counts_gains_from_the_origin_it_is_given():
    """The race's verdict on a rival's faithfulness is twin_faithful's, from the same origin: a rival that gained 0.5
    dB over its start is unfaithful against a twin gaining 6, but not counted from an origin 20 dB below the real
    run's start and 6 dB below its twin's (20.5 dB against 12)."""
    creeping = [-19.0 - 0.05 * k for k in range(101)]
    settled = [20.0 + min(k, 5) * 0.1 for k in range(101)]
    twin_gaining = [30.0 + 0.3 * k for k in range(101)]
    assert _race(creeping, settled, twin_gaining, to_beat=-36.0, first_faithful=False) == SETTLE_STEPS
    origin = torch.tensor([0.0, 24.0])
    assert _race(creeping, settled, twin_gaining, to_beat=-36.0, first_faithful=False, origin=origin) is None


def test_a_rival_on_the_early_rivals_pace_runs_on_through_a_flat_start():
    """kl-f8 flat_noise at 128 px (session 18): the rival from the first run's pixel-best sat near -23.85 dB for its
    first 20 iterations, 1.6 dB behind the standing pick's -25.47, then fell to -26.38 and won; the rate over those 20
    projected no catching up, so the race stopped it. The early rival gained 1.95 dB over its 100 iterations on the same
    twin: at that pace the flat start could still catch up, so with the pace it runs on -- until it falls off it."""
    gaining = [20.0 + 0.2 * k for k in range(101)]
    late = [-23.83 - 0.0025 * k for k in range(21)] + [-23.88 - 0.0315 * k for k in range(1, 81)]  # -26.4 at 100
    assert _race(late, gaining, gaining, to_beat=-25.47, first_faithful=True) == SETTLE_STEPS
    assert _race(late, gaining, gaining, to_beat=-25.47, first_faithful=True, pace=0.0195) is None
    flat = [-23.83 - 0.0025 * k for k in range(101)]  # never falls: stopped once the pace cannot close the gap
    k = _race(flat, gaining, gaining, to_beat=-25.47, first_faithful=True, pace=0.0195)
    assert k is not None and 40 < k < 60
