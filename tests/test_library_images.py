"""core/adapters/images.load_image, what the command line and the Ray path read files with: the orientation a viewer
shows, 16-bit greyscale at its depth, nothing clipped or cut without an error naming the file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.adapters.images import load_image, upright_size
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


def test_the_source_size_is_the_upright_one_the_crop_is_cut_from(tmp_path):
    """The command line's `source_size` metadata: a sideways-stored 37x45 file shows as 45x37, cropped to 40x32."""
    upright = smooth_image(0, 45, 37)
    exif = Image.Exif()
    exif[0x0112] = ROTATED
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    upright.save(tmp_path / "upright.png")
    assert Image.open(tmp_path / "phone.png").size == (37, 45)
    assert upright_size(tmp_path / "phone.png") == upright_size(tmp_path / "upright.png") == (45, 37)
    assert load_image(tmp_path / "phone.png").shape == (1, 3, 32, 40)


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


def _write_deep_png(path, values: np.ndarray, exif: bytes | None = None) -> None:
    """A 16-bit-per-channel PNG written by pypng (Pillow cannot write 16-bit colour), with an eXIf chunk if given."""
    import io

    import png

    height, width, planes = values.shape
    buffer = io.BytesIO()
    png.Writer(width, height, greyscale=planes < 3, alpha=planes in (2, 4), bitdepth=16).write(
        buffer, values.reshape(height, width * planes))
    chunks = list(png.Reader(bytes=buffer.getvalue()).chunks())
    if exif is not None:
        chunks.insert(1, (b"eXIf", exif))  # after IHDR, before the image data
    with open(path, "wb") as out:
        png.write_chunks(out, chunks)


def _deep_ramp(height: int, width: int, planes: int) -> np.ndarray:
    ramp = np.linspace(0, 65535, height * width * planes).reshape(height, width, planes)
    return ramp.astype(np.uint16)


@pytest.mark.parametrize("planes", [3, 4, 2], ids=["rgb48", "rgba64", "grey-alpha32"])
def test_16_bit_colour_pngs_keep_their_depth_instead_of_eight_bits(tmp_path, planes):
    values = _deep_ramp(24, 40, planes)
    _write_deep_png(tmp_path / "deep.png", values)
    eight = np.asarray(Image.open(tmp_path / "deep.png").convert("RGB"), dtype=np.float32) / 255
    pixels = load_image(tmp_path / "deep.png")
    colour = values[..., :3] if planes >= 3 else np.repeat(values[..., :1], 3, axis=-1)
    want = torch.from_numpy(colour.astype(np.float32) / 65535).permute(2, 0, 1)[None]
    assert pixels.shape == (1, 3, 24, 40) and torch.allclose(pixels, want, atol=1e-7)  # alpha dropped
    assert len(torch.unique(pixels)) > 256  # finer than 8 bits ...
    assert (pixels - torch.from_numpy(eight).permute(2, 0, 1)[None]).abs().max() > 1 / 512  # ... which Pillow gives


def test_a_16_bit_colour_png_is_turned_by_its_exif_orientation(tmp_path):
    upright = _deep_ramp(32, 48, 3)
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # ROTATE_90 (counter-clockwise), undone by orientation 6
    exif = Image.Exif()
    exif[0x0112] = ROTATED
    _write_deep_png(tmp_path / "phone.png", stored, exif.tobytes())
    _write_deep_png(tmp_path / "upright.png", upright)
    assert Image.open(tmp_path / "phone.png").getexif().get(0x0112) == ROTATED  # the premise: Pillow sees the tag
    pixels = load_image(tmp_path / "phone.png")
    assert pixels.shape == (1, 3, 32, 48) and torch.equal(pixels, load_image(tmp_path / "upright.png"))
    assert len(torch.unique(pixels)) > 256  # read at depth, then turned


def test_other_16_bit_colour_files_are_refused_not_read_as_8_bits(tmp_path):
    values = _deep_ramp(16, 16, 3).astype(">u2")
    (tmp_path / "deep.ppm").write_bytes(b"P6\n16 16\n65535\n" + values.tobytes())
    assert Image.open(tmp_path / "deep.ppm").mode == "RGB"  # the premise: Pillow would hand over 8 bits
    with pytest.raises(ValueError, match=r"deep.ppm: 16 bits per colour channel \(PPM\).*save it as a 16-bit PNG"):
        load_image(tmp_path / "deep.ppm")
    (tmp_path / "flat.ppm").write_bytes(b"P6\n16 16\n255\n" + bytes(16 * 16 * 3))
    assert torch.equal(load_image(tmp_path / "flat.ppm"), torch.zeros(1, 3, 16, 16))
