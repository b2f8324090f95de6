"""Unit tests for core.diagnostics with plain torch: metrics on known cases, the cocoercivity
estimate on linear operators with known beta, and the solver's recorded trajectory."""
from __future__ import annotations

import math

import pytest
import torch

from core import Codec, invert
from core.diagnostics import cocoercivity, fingerprint, reconstruction, same_fingerprint


def spd(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g))
    return q @ torch.diag(torch.tensor(eigs)) @ q.T


def test_cocoercivity_of_a_symmetric_operator_is_one_over_its_largest_eigenvalue():
    a = spd([0.5, 1.0, 2.0, 5.0])  # T(z) = A (z - z*) is (1/5)-cocoercive, and no more
    z_star = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    g = torch.Generator().manual_seed(1)
    zs = [z_star + torch.randn(1, 4, generator=g) for _ in range(400)]
    # the top eigenvector attains the bound exactly
    v = torch.linalg.eigh(a).eigenvectors[:, -1]
    zs.append(z_star + v[None])
    ts = [(z - z_star) @ a.T for z in zs]
    r = cocoercivity(zs, ts, z_star)[0]
    assert r["beta_min"] == pytest.approx(1 / 5, rel=1e-4)
    assert r["share_positive"] == 1.0 and r["points"] == len(zs)
    assert 1 / 5 <= r["beta_median"] <= 1 / 0.5


def test_cocoercivity_flags_a_rotation_that_is_not_cocoercive():
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # <Tz, z> = 0: beta = 0, never positive
    zs = [torch.randn(1, 2) for _ in range(20)]
    r = cocoercivity(zs, [z @ rot.T for z in zs], torch.zeros(1, 2))[0]
    assert abs(r["beta_min"]) < 1e-6 and r["share_positive"] < 1.0
    anti = cocoercivity(zs, [-z for z in zs], torch.zeros(1, 2))[0]  # T = -I: pushes away
    assert anti["beta_min"] == pytest.approx(-1.0) and anti["share_positive"] == 0.0


def test_cocoercivity_is_per_sample_skips_z_star_and_honours_last():
    zs = [torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [-1.0]]), torch.tensor([[3.0], [0.0]])]
    ts = [torch.tensor([[1.0], [1.0]]), torch.tensor([[5.0], [1.0]]), torch.tensor([[-1.0], [1.0]])]
    r = cocoercivity(zs, ts, torch.tensor([[0.0], [0.0]]), last=[2, 1])
    # sample 0: k=1 is z* (skipped); beta = 1/1 and -3/1; sample 1 stops at k=1: 2/1, -1/1
    assert r[0]["points"] == 2 and r[0]["beta_min"] == pytest.approx(-3.0) and r[0]["share_positive"] == 0.5
    assert r[1]["points"] == 2 and r[1]["beta_min"] == pytest.approx(-1.0)


def test_solver_records_the_trajectory_and_reports_the_assumption():
    # D = W (well conditioned), E = 0.9 I: T(z) = 0.9 (W z - x) is cocoercive because W + W^T > 0
    w = torch.tensor([[1.0, 0.2, 0.1], [0.0, 0.9, 0.2], [0.1, 0.0, 1.1]])

    def dec(z):
        return torch.einsum("ij,bjhw->bihw", w, z)

    def enc(x):
        return 0.9 * x
    x = dec(torch.rand(2, 3, 4, 4) * 0.5)
    r = invert(Codec(enc, dec), x, method="forward", lr=0.8, steps=30, record_every=1)
    for s in r.samples:
        c = s.cocoercivity
        # iterates that reach z* to machine precision carry no information and are skipped
        assert 10 <= c["points"] <= 30 and c["share_positive"] == 1.0 and c["beta_min"] > 0
    r2 = invert(Codec(enc, dec), x, method="forward", lr=0.2, steps=30, record_every=10)
    assert r2.samples[0].cocoercivity["points"] == 3  # k = 0, 10, 20 (30 is the best iterate)
    assert invert(Codec(enc, dec), x, method="forward", steps=3).samples[0].cocoercivity is None
    assert "cocoercivity" in r.to_dict()["samples"][0]


def test_record_every_is_validated():
    codec = Codec(lambda x: x, lambda z: z)
    with pytest.raises(ValueError, match="record_every"):
        invert(codec, torch.rand(1, 3, 2, 2), record_every=-1)
    with pytest.raises(ValueError, match="track_residual"):
        invert(codec, torch.rand(1, 3, 2, 2), method="gradient", track_residual=False, record_every=1)


def test_reconstruction_metrics_on_known_cases():
    codec = Codec(encode=lambda x: 0.5 * x, decode=lambda z: 2.0 * z)  # E(x) is exact here
    x = torch.full((1, 3, 4, 4), 0.5)
    z = 0.5 * x + 0.05  # decodes 0.1 too bright everywhere: MSE 0.01 -> 20 dB
    ref = 0.5 * x
    r = reconstruction(codec, x, z, reference=ref)
    s = r["samples"][0]
    assert s["psnr"] == pytest.approx(20.0, abs=1e-4)
    assert s["max_abs_error"] == pytest.approx(0.1, abs=1e-6)
    assert s["residual_db"] == pytest.approx(20 * math.log10(0.05 / 0.25), abs=1e-3)
    assert s["nmse_db_reference"] == pytest.approx(10 * math.log10(0.05**2 / 0.25**2), abs=1e-3)
    assert math.isinf(s["psnr_encoder"]) and s["max_abs_error_encoder"] == 0.0
    assert r["error_map"].shape == (1, 4, 4) and torch.allclose(r["error_map"], torch.full((1, 4, 4), 0.1))
    assert not reconstruction(codec, x, z, baseline=False)["samples"][0].get("gain_db")


def test_fingerprint_tells_a_changed_latent_apart():
    z = torch.randn(1, 4, 8, 8)
    fp = fingerprint(z)
    assert same_fingerprint(fp, fingerprint(z.clone()))
    z2 = z.clone()
    z2[0, 0, 0, 0] += 1e-2
    assert not same_fingerprint(fp, fingerprint(z2))
    assert not same_fingerprint(fp, fingerprint(z.reshape(1, 4, 4, 16)))
