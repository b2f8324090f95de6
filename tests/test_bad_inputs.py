"""Bad inputs found by a probe of the real server (issue 14), on the real ComfyUI host: each is
an error naming the input (or the JSON field) and the fix, or a report that says what is wrong,
never a raw library error, a huge allocation or a silently wrong number."""
from __future__ import annotations

import json

import pytest
import torch

import core

KEY = core.TreeRingKey((4, 16, 16), "ring", radius=5, channel=3, seed=7)


def pack_key(pack):
    """KEY as the pack's own class (the pack's core is another module than the top-level core)."""
    return pack("core").TreeRingKey.from_json(KEY.to_json())


def detect(pack, noise, key_json=None, key=None):
    node = pack("nodes.treering").TreeRingDetect
    with torch.inference_mode():
        return node.execute({"samples": noise}, key, key_json or "").result


def edited_key(**fields) -> str:
    d = KEY.to_dict()
    d.update(fields)
    return json.dumps(d)


@pytest.mark.parametrize("fields,match", [
    (dict(seed=10**30), r"seed: must be an integer from 0 to 18446744073709551615"),
    (dict(seed=1e30), r"seed: must be an integer"),
    (dict(shape=[4, 1e6, 1e6]), r"shape: must hold three integers"),
    (dict(shape=[4, 1000000, 1000000]), r"shape: 4x1000000x1000000 is larger than any latent"),
    (dict(shape=["a", "b", "c"]), r"shape: must hold three integers"),
    (dict(shape=[4.9, 16, 16]), r"shape: must hold three integers .*got \[4.9, 16, 16\]"),
    (dict(shape=[4, 16]), r"shape: must be \[channels, height, width\]"),
    (dict(radius=True), r"radius: must be an integer >= 1 .*got True"),
    (dict(channel=False), r"channel: must be -1"),
])
def test_treering_detect_rejects_bad_key_json_fields_by_name(pack, fields, match):
    """Checked before anything is allocated: the shape check precedes every tensor the key makes."""
    with pytest.raises(ValueError, match=match):
        detect(pack, torch.randn(1, 4, 16, 16), key_json=edited_key(**fields))


def test_empty_batches_are_named_errors_not_fft_errors(pack):
    with pytest.raises(ValueError, match="noise: the batch is empty"):
        detect(pack, torch.zeros(0, 4, 16, 16), key=pack_key(pack))
    node = pack("nodes.treering").TreeRingWatermarkedNoise
    with torch.inference_mode(), pytest.raises(ValueError, match="latent: the batch is empty"):
        node.execute(pack_key(pack), 0, {"samples": torch.zeros(0, 4, 16, 16)})
    with pytest.raises(core.WatermarkKeyError, match="noise: the batch is empty"):
        core.inject(torch.zeros(0, 4, 16, 16), KEY)


def test_all_zero_noise_error_names_the_noise_input(pack):
    with pytest.raises(ValueError, match=r"^noise: its spectrum is zero"):
        detect(pack, torch.zeros(1, 4, 16, 16), key=pack_key(pack))


def test_diagnostics_says_when_the_trace_belongs_to_another_image(pack, node_cls, taef2, photos64):
    diag = pack("nodes.diagnostics").InversionDiagnostics
    with torch.inference_mode():
        latent, _ = node_cls.execute(photos64["astronaut"], taef2, 3, "adam").result
        other = diag.execute(taef2, photos64["coffee"], latent, False).result
        same = diag.execute(taef2, photos64["astronaut"], latent, False).result
    report, data = other[0], json.loads(other[1])
    assert "belongs to another image" in report and "encoded from another image" in report
    assert data["trace_of_another_image"] and not data["has_trace"]
    assert "best at" not in report  # the other image's solver trace is not shown as this one's
    assert "belongs to another image" not in same[0] and json.loads(same[1])["has_trace"]


def test_decode_exact_tiled_rejects_nan_latents(pack, taef2):
    z = torch.zeros(1, taef2.latent_channels, 8, 8)
    z[0, 0, 3, 3] = float("nan")
    node = pack("nodes.decode_tiled").VAEDecodeExactTiled
    with torch.inference_mode(), pytest.raises(ValueError, match="samples: contains NaN or Inf"):
        node.execute({"samples": z}, taef2, 64, 0)


def test_inpaint_with_an_all_ones_mask_says_the_outside_region_is_empty(pack, taef2, photos64):
    node = pack("nodes.inpaint").VAEExactEncodeForInpaint
    with torch.inference_mode():
        latent, summary = node.execute(photos64["coffee"], taef2, torch.ones(1, 64, 64), 6, 2, "adam").result
    assert "the region outside the grown mask is empty" in summary
    assert "PSNR of the decode outside" not in summary
    assert latent["noise_mask"].min() == 1
