"""core/adapters/images.load_image, what the command line and the Ray path read files with: the orientation a viewer
shows, 16-bit greyscale at its depth, nothing clipped or cut without an error naming the file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.adapters.images import load_image
from tests.support.cli_data import smooth_image

ROTATED = 6  # EXIF orientation "rotate 90 CW to view": the pixels are stored sideways


def test_exif_orientation_is_applied_as_comfyuis_load_image_does(tmp_path):
    upright = smooth_image(0, 48, 32)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone writes, with the tag that undoes it
    exif = Image.Exif()
    exif[0x0112] = ROTATED
    stored.save(tmp_path / "phone.png", exif=exif)
    upright.save(tmp_path / "upright.png")
    pixels = load_image(tmp_path / "phone.png")
    assert pixels.shape == (1, 3, 32, 48)
    assert torch.equal(pixels, load_image(tmp_path / "upright.png"))


def test_16_bit_grey_keeps_its_depth_instead_of_clipping_to_white(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 40).reshape(32, 40).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    pixels = load_image(tmp_path / "grey16.png")
    want = torch.from_numpy(ramp.astype(np.float32) / 65535)
    assert pixels.shape == (1, 3, 32, 40) and all(torch.allclose(pixels[0, c], want, atol=1e-6) for c in range(3))
    assert len(torch.unique(pixels[0, 0])) > 256  # finer than 8 bits


def test_float_images_must_lie_in_the_unit_range(tmp_path):
    Image.fromarray(np.full((16, 16), 0.25, np.float32)).save(tmp_path / "ok.tiff")
    assert torch.allclose(load_image(tmp_path / "ok.tiff"), torch.full((1, 3, 16, 16), 0.25))
    Image.fromarray(np.full((16, 16), 3.0, np.float32)).save(tmp_path / "hdr.tiff")
    with pytest.raises(ValueError, match=r"hdr.tiff: F pixels span 3\.\.3, outside 0\.\.1; save it as"):
        load_image(tmp_path / "hdr.tiff")


def test_an_animation_is_refused_not_cut_to_its_first_frame(tmp_path):
    frames = [smooth_image(i, 16, 16) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match=r"anim.gif: 3 frames \(GIF\).*extract the frames first"):
        load_image(tmp_path / "anim.gif")
    frames[0].save(tmp_path / "still.gif")
    assert load_image(tmp_path / "still.gif").shape == (1, 3, 16, 16)
