"""Inversion Diagnostics on the real ComfyUI host with real VAEs (TAEF2, kl_f8_small)."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="session")
def diag_cls(pack):
    return pack("nodes.diagnostics").InversionDiagnostics


@pytest.fixture
def diagnose(diag_cls):
    def run(vae, image, latent, compare_encoder=True, reference=None):
        with torch.inference_mode():
            out = diag_cls.execute(vae, image, latent, compare_encoder, reference)
        report, data, convergence, error_map = out.result
        return report, json.loads(data), convergence, error_map, out.ui

    return run


@pytest.fixture(scope="module")
def exact(taef2, photos64, node_cls):
    image = torch.cat([photos64["astronaut"], photos64["coffee"]])
    with torch.inference_mode():
        latent, _ = node_cls.execute(image, taef2, 20, "adam").result
    return image, latent


def test_exact_latent_shows_a_positive_gain_its_trace_and_the_assumption(exact, taef2, diagnose):
    image, latent = exact
    report, data, convergence, error_map, ui = diagnose(taef2, image, latent)
    assert data["has_trace"] and len(data["images"]) == 2
    for img in data["images"]:
        assert img["gain_db"] > 0.3, img
        assert img["psnr"] == pytest.approx(img["solver"]["psnr_best"], abs=0.05)  # same decode, re-measured
        assert img["residual_db"] < img["residual_db_encoder"]
        # 20 steps, or 20 + the rival's start + its 20 where the default returned the gradient rival's pick, and 21
        # more where the rival run again from the first run's pixel-best won too (session 17)
        assert len(img["solver"]["trace"]["psnr"]) == img["solver"]["iterations"] + 1 in (21, 42, 63)
        coco = img["cocoercivity"]
        assert coco["points"] >= 10 and 0 <= coco["share_positive"] <= 1
    assert report.count("gain +") == 2 and "assumption (cocoercivity" in report
    assert convergence.shape == error_map.shape == (2, 512, 768, 3)
    assert convergence.dtype == torch.float32 and 0 <= convergence.min() and convergence.max() <= 1
    assert convergence.std() > 0.05 and error_map.std() > 0.05  # drawn, not blank
    assert ui.as_dict() == {"text": (report,)}  # shown on the node by web/exact_encode.js


def test_stock_latent_shows_zero_gain_and_no_trace(taef2, photos64, stock, diagnose):
    image = photos64["rocket"]
    latent = stock.encode(taef2, image)
    report, data, convergence, _, _ = diagnose(taef2, image, latent)
    img = data["images"][0]
    assert not data["has_trace"] and img["solver"] is None and img["cocoercivity"] is None
    assert img["gain_db"] == pytest.approx(0.0, abs=1e-4)
    assert "no trace" in report and convergence.shape == (1, 512, 768, 3)


def test_reference_latent_adds_the_papers_nmse(exact, taef2, stock, diagnose):
    image, latent = exact
    plain = stock.encode(taef2, image)
    _, data, _, _, _ = diagnose(taef2, image, latent, reference=latent)
    assert data["images"][0]["nmse_db_reference"] == "-inf"  # the latent is its own reference
    _, data, _, _, _ = diagnose(taef2, image, plain, reference=latent, compare_encoder=False)
    img = data["images"][0]
    assert img["nmse_db_reference"] < -5 and "psnr_encoder" not in img and "gain_db" not in img


def test_trace_travels_through_stock_nodes_and_is_dropped_when_the_latent_changes(
        exact, host, taef2, stock, diagnose):
    image, latent = exact
    n = host.nodes
    with torch.inference_mode():
        masked = n.SetLatentNoiseMask().set_mask(latent, torch.ones(1, 64, 64))[0]
        decoded = stock.decode(taef2, latent)
        batch = n.LatentBatch().batch(latent, latent)[0] if hasattr(n, "LatentBatch") else None
        repeated = n.RepeatLatentBatch().repeat(latent, 2)[0]
    assert decoded.shape == image.shape and repeated["samples"].shape[0] == 4
    assert batch is None or batch["samples"].shape[0] == 4
    assert diagnose(taef2, image, masked)[1]["has_trace"]  # same tensor: the trace still applies
    changed = {"samples": latent["samples"].clone()}
    changed["samples"].__dict__.update(latent["samples"].__dict__)  # a node copying attributes...
    changed["samples"][0, 0, 0, 0] += 0.5  # ...then editing the latent: the fingerprint catches it
    assert not diagnose(taef2, image, changed)[1]["has_trace"]


@pytest.mark.parametrize("case, match", [
    ("channels", r"latent: shape \(1, 4, 8, 8\) does not match .* 64x64 px image .* to \(1, 32, 8, 8\)"),
    ("size", r"latent: shape \(1, 32, 2, 2\) does not match .* to \(1, 32, 8, 8\)"),
    ("batch", r"latent: batch of 2 but image: batch of 1"),
    ("reference", r"reference: shape \(1, 32, 2, 2\) differs from latent: \(1, 32, 8, 8\)"),
], ids=["channels", "size", "batch", "reference"])
def test_mismatched_inputs_fail_naming_both_shapes(case, match, taef2, kl_small, photos64, stock, diagnose):
    image = photos64["chelsea"]
    good = stock.encode(taef2, image)
    kwargs = {}
    if case == "channels":
        latent = stock.encode(kl_small, image)
    elif case == "size":
        latent = {"samples": good["samples"][:, :, :2, :2]}
    elif case == "batch":
        latent = {"samples": good["samples"].repeat(2, 1, 1, 1)}
    else:
        latent, kwargs = good, {"reference": {"samples": good["samples"][:, :, :2, :2]}}
    with pytest.raises(ValueError, match=match):
        diagnose(taef2, image, latent, **kwargs)
