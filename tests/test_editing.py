"""Editing workflows' nodes on the real ComfyUI host with the real TAEF2 weights: round-trip drift
(stock VAE Encode vs VAE Exact Encode over generations), VAE Exact Encode (for Inpaint) against stock
VAE Encode (for Inpainting) / Set Latent Noise Mask, and Image Error (Masked)."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import core

SIZE = 64


@pytest.fixture(scope="session")
def pack_nodes(pack):
    return pack("nodes")


def centre_mask(size=SIZE, batch=1):
    m = torch.zeros(batch, size, size)
    m[:, size // 4: size * 3 // 4, size // 4: size * 3 // 4] = 1.0
    return m


# ---- core.drift (pure torch) ----

def _linear_codec():
    w = torch.tensor([[1.0, 0.2, 0.1], [0.3, 0.9, 0.2], [0.1, 0.3, 1.1]])

    def dec(z):
        return torch.einsum("ij,bjhw->bihw", w, z).clamp(0, 1)

    def enc(x):
        return torch.einsum("ij,bjhw->bihw", 0.9 * torch.eye(3), x)
    return core.Codec(enc, dec)


def test_core_drift_compounds_with_the_plain_encoder_and_not_with_exact_encoding():
    codec = _linear_codec()
    x = codec.decode(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.4 + 0.2)
    options = core.InversionOptions(method="forward", lr=0.8, steps=60)
    result = core.drift(codec, x, {"plain": codec.encode,
                                   "exact": lambda p: core.invert(codec, p, options).latent}, 4, keep_all=True)
    plain, exact = result.psnr["plain"], result.psnr["exact"]
    assert plain.shape == exact.shape == (5, 2) and torch.isinf(plain[0]).all()
    assert (plain[1:-1] > plain[2:]).all()  # every generation loses more
    assert (exact[-1] > plain[-1] + 20).all()
    assert len(result.history["exact"]) == 4 and result.finals["exact"].shape == x.shape
    assert "after generation 4" in result.report()


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_core_drift_rejects_bad_generations(bad):
    with pytest.raises(ValueError, match="generations must be an integer >= 1"):
        core.drift(_linear_codec(), torch.rand(1, 3, 8, 8), {"plain": lambda x: x}, bad)


# ---- VAE Round-Trip Drift on TAEF2 ----

def test_drift_node_on_taef2_exact_beats_stock_after_five_generations(pack_nodes, taef2, photos64):
    image = photos64["astronaut"]
    with torch.inference_mode():
        out = pack_nodes.VAERoundTripDrift.execute(image, taef2, 5, 8, "adam")
    stock, exact, side, plot, report = out.result
    assert stock.shape == exact.shape == image.shape
    assert side.shape == (1, SIZE, 3 * SIZE, 3) and torch.equal(side[:, :, :SIZE], image)
    assert plot.shape == (1, 512, 768, 3) and plot.std() > 0.05
    assert out.ui.as_dict() == {"text": (report,)}
    rows = {int(line.split()[0]): [float(v) for v in line.split()[1:]] for line in report.splitlines()
            if line.strip()[:1].isdigit()}
    print("\n" + report)
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert rows[5][1] > rows[5][0] + 1.0  # measured at 64 px, 8 steps: see the report printed above

    def psnr(a):
        return core.psnr_from_mse(core.per_sample_mse(a.movedim(-1, 1), image.movedim(-1, 1))).item()
    assert psnr(stock) == pytest.approx(rows[5][0], abs=0.01) and psnr(exact) == pytest.approx(rows[5][1], abs=0.01)


@pytest.mark.parametrize("kwargs,match", [
    (dict(generations=0), "generations must be an integer >= 1"),  # core.drift's check
    (dict(steps=0), "VAE Round-Trip Drift: steps must be an integer >= 1"),  # core's, titled by the schema
    (dict(method="gradient"), "method: must be one of adam, forward, km, anderson; got 'gradient'"),
])
def test_drift_node_bad_input_names_the_input(pack_nodes, taef2, photos64, kwargs, match):
    args = dict(generations=2, steps=2, method="adam") | kwargs
    with torch.inference_mode(), pytest.raises(ValueError, match=match):
        pack_nodes.VAERoundTripDrift.execute(photos64["astronaut"], taef2, **args)


# ---- VAE Exact Encode (for Inpaint) ----

@pytest.fixture(scope="module")
def inpaint_case(pack_nodes, taef2, photos64, host):
    """Stock VAE Encode (for Inpainting) and VAE Encode + Set Latent Noise Mask vs the exact node
    (weighted and unweighted best-iterate selection), decoded, with the error outside the grown mask."""
    n = host.nodes
    image, mask = photos64["coffee"], centre_mask()
    with torch.inference_mode():
        exact, summary = pack_nodes.VAEExactEncodeForInpaint.execute(image, taef2, mask, 6, 20, "adam").result
        stock_inpaint = n.VAEEncodeForInpaint().encode(taef2, image, mask, 6)[0]
        stock = n.SetLatentNoiseMask().set_mask(n.VAEEncode().encode(taef2, image)[0], mask)[0]
        codec, free = pack_nodes.adapter.vae_codec(taef2), core.InversionOptions(method="adam", steps=20, rival="")
        full = core.invert(codec, image.movedim(-1, 1), free).latent  # same method as the node, no rival
        weighted = core.invert(codec, image.movedim(-1, 1), free, weight=1.0 - exact["noise_mask"]).latent

        def decode(lat):
            return n.VAEDecode().decode(taef2, {"samples": lat})[0]
        decoded = {"exact": decode(exact["samples"]), "stock": decode(stock["samples"]),
                   "exact, unweighted selection": decode(full), "exact, weighted selection": decode(weighted)}
        composite_node = importlib.import_module("comfy_extras.nodes_mask").ImageCompositeMasked()
        composite = {k: composite_node.composite(image, v, 0, 0, False, mask)[0]
                     for k, v in decoded.items()}
    keep = 1.0 - exact["noise_mask"]
    err = {k: core.region_error(v.movedim(-1, 1), image.movedim(-1, 1), keep)[0] for k, v in decoded.items()}
    err_comp = {k: core.region_error(v.movedim(-1, 1), image.movedim(-1, 1), keep)[0] for k, v in composite.items()}
    print("\n" + summary)
    for k in err:
        print(f"outside the grown mask, {k}: decoded PSNR {err[k]['psnr']:.2f} dB, max abs {err[k]['max_abs']:.4f}; "
              f"composited PSNR {err_comp[k]['psnr']}, max abs {err_comp[k]['max_abs']}")
    return dict(exact=exact, stock_inpaint=stock_inpaint, stock=stock, err=err, err_comp=err_comp, summary=summary)


def test_inpaint_latent_is_interchangeable_with_stock(inpaint_case):
    exact, stock_inpaint = inpaint_case["exact"], inpaint_case["stock_inpaint"]
    assert set(exact) == {"samples", "noise_mask"} == set(stock_inpaint)
    assert exact["samples"].shape == stock_inpaint["samples"].shape
    assert torch.equal(exact["noise_mask"], stock_inpaint["noise_mask"])  # same resize, crop and growth


def test_inpaint_exact_encode_preserves_the_unmasked_area_better_than_stock(inpaint_case):
    err, err_comp = inpaint_case["err"], inpaint_case["err_comp"]
    assert err["exact"]["psnr"] > err["stock"]["psnr"] + 1.0
    assert err["exact"]["max_abs"] < err["stock"]["max_abs"]
    # the same iterates (no rival), the selection by exactly this error: never worse than selecting by the whole image
    # (the node's own run adds the default's rivals, whose picks their twins choose, so it is not that comparison)
    assert err["exact, weighted selection"]["psnr"] >= err["exact, unweighted selection"]["psnr"] - 1e-6
    assert err["exact"]["psnr"] >= err["exact, weighted selection"]["psnr"] - 1.0, "the rivals cost the kept area"
    for k in err_comp:  # ImageCompositeMasked with the binary mask returns the original outside it
        assert err_comp[k]["psnr"] == math.inf and err_comp[k]["max_abs"] == 0.0
    assert "outside the grown mask" in inpaint_case["summary"]


def test_inpaint_mask_of_another_aspect_ratio_is_a_clear_error(pack_nodes, taef2, photos64):
    mask = torch.zeros(1, 32, 64)
    mask[:, 8:16, 8:16] = 1
    with torch.inference_mode(), pytest.raises(ValueError, match="mask: 64x32 px does not match the image's 64x64"):
        pack_nodes.VAEExactEncodeForInpaint.execute(photos64["coffee"], taef2, mask, 6, 2, "adam")
    with torch.inference_mode(), pytest.raises(ValueError, match="mask: batch of 3 masks for 1 images"):
        pack_nodes.VAEExactEncodeForInpaint.execute(photos64["coffee"], taef2, centre_mask(batch=3), 6, 2, "adam")


def test_inpaint_empty_load_image_mask_is_resized_like_stock(pack_nodes, taef2, photos64):
    """Load Image gives a 64x64 zero mask for images without alpha: accepted, like stock."""
    image = torch.nn.functional.interpolate(photos64["coffee"].movedim(-1, 1), size=(48, 80)).movedim(1, -1)
    with torch.inference_mode():
        latent, _ = pack_nodes.VAEExactEncodeForInpaint.execute(image, taef2, torch.zeros(1, 64, 64), 6, 2,
                                                                "adam").result
    assert latent["noise_mask"].shape == (1, 1, 48, 80) and latent["noise_mask"].sum() == 0


def test_image_masked_error_node(pack_nodes, photos64):
    ref = photos64["coffee"]
    edited = ref.clone()
    edited[:, SIZE // 4: SIZE * 3 // 4, SIZE // 4: SIZE * 3 // 4] = 0.0  # changed only inside the mask
    node = pack_nodes.ImageMaskedError
    psnr, max_abs, report = node.execute(ref, edited, "outside mask", 0, centre_mask()).result
    assert psnr == math.inf and max_abs == 0.0 and "inf (identical)" in report
    psnr_in, max_in, _ = node.execute(ref, edited, "inside mask", 0, centre_mask()).result
    assert math.isfinite(psnr_in) and max_in == pytest.approx(ref[:, 16:48, 16:48].max().item())
    with pytest.raises(ValueError, match="mask: region 'outside mask' needs a mask"):
        node.execute(ref, edited, "outside mask", 0, None)
    with pytest.raises(ValueError, match="image: 32x64 px but reference: 64x64 px"):
        node.execute(ref, edited[:, :, :32], "whole image", 0, None)


def test_core_invert_weight_selects_by_the_weighted_error_and_checks_its_shape():
    codec = _linear_codec()
    x = codec.decode(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.4 + 0.2)
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :4] = 1.0
    r = core.invert(codec, x, core.InversionOptions(method="forward", lr=0.8, steps=10), weight=keep)
    z_keep = core.region_error(codec.decode(r.latent), x, keep)[0]["psnr"]
    assert r.samples[0].psnr_best == pytest.approx(z_keep, abs=1e-3)  # PSNR reported over the weighted region
    with pytest.raises(ValueError, match=r"weight must be \(B or 1, 1, H, W\)"):
        core.invert(codec, x, steps=2, weight=torch.ones(1, 1, 4, 4))
    assert core.region_error(x, x, torch.zeros(1, 1, 8, 8))[0] == {"psnr": None, "max_abs": None, "pixels": 0}
