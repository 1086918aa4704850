"""Decoding at the trust boundary: every mode to RGB, or a clear client error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.errors import InvalidImage, PayloadTooLarge
from app.inference.decode import decode_image, load_rgb, open_image
from tests.helpers import image_bytes

LIMIT = 40_000_000


def encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_accepted_format_decodes_to_rgb(fmt: str) -> None:
    image = decode_image(image_bytes((40, 80), fmt=fmt), max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert image.size == (40, 80)


@pytest.mark.parametrize(
    ("mode", "color", "fmt"),
    [
        ("L", 200, "PNG"),
        ("1", 1, "PNG"),
        ("LA", (200, 255), "PNG"),
        ("RGBA", (10, 200, 30, 255), "PNG"),
        ("CMYK", (0, 255, 255, 0), "JPEG"),
        ("CMYK", (0, 255, 255, 0), "TIFF"),
        ("P", 3, "PNG"),
        ("YCbCr", (120, 100, 200), "JPEG"),
    ],
)
def test_other_modes_become_rgb(mode: str, color: object, fmt: str) -> None:
    data = encoded(Image.new(mode, (16, 32), color), fmt)  # type: ignore[arg-type]
    image = decode_image(data, max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert image.size == (16, 32)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    pixels = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    data = encoded(Image.fromarray(pixels), "PNG")
    image = decode_image(data, max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert abs(int(np.asarray(image)[0, 0, 0]) - 128) <= 1


def test_transparent_areas_become_black_whatever_their_hidden_colour() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))  # invisible white
    image = decode_image(encoded(rgba, "PNG"), max_pixels=LIMIT)
    assert np.asarray(image).max() == 0
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 250, 250, 250] + [0] * 762)
    image = decode_image(encoded(palette, "PNG", transparency=1), max_pixels=LIMIT)
    assert np.asarray(image).max() == 0


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    data = encoded(Image.new("RGB", (40, 80), (0, 0, 255)), "JPEG", exif=exif)
    assert decode_image(data, max_pixels=LIMIT).size == (80, 40)


def test_animations_give_their_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    red, _green, blue = np.asarray(decode_image(buffer.getvalue(), max_pixels=LIMIT))[8, 8]
    assert red > 200
    assert blue < 50


def test_extreme_shapes_still_decode() -> None:
    for size in ((1, 1), (10_000, 2), (2, 10_000)):
        assert decode_image(image_bytes(size, fmt="PNG"), max_pixels=LIMIT).size == size


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello, I am not an image", "not a decodable image"),
        (b"%PDF-1.4\n", "not a decodable image"),
        (image_bytes(fmt="JPEG")[:300], "truncated or corrupt"),
        (image_bytes(fmt="PNG")[:60], "truncated or corrupt"),
    ],
)
def test_undecodable_input_is_a_client_error(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidImage, match=reason):
        decode_image(data, max_pixels=LIMIT)


def test_decompression_bombs_are_refused_before_decoding() -> None:
    # 20000x20000 of one colour compresses to a few hundred kilobytes.
    bomb = encoded(Image.new("1", (20_000, 20_000)), "PNG")
    assert len(bomb) < 1_000_000
    with pytest.raises(PayloadTooLarge, match="over the limit of 40000000"):
        decode_image(bomb, max_pixels=LIMIT)
    with pytest.raises(PayloadTooLarge, match="over the limit of 1000"):
        decode_image(image_bytes((50, 50)), max_pixels=1000)


def test_large_jpegs_open_at_reduced_scale_and_other_files_at_full_size() -> None:
    big = image_bytes((2000, 3000))
    reduced = open_image(big, max_pixels=10**8, reduce_to=448)
    assert reduced.size == (500, 750)  # 1/4: the smallest scale keeping both sides >= 448
    assert load_rgb(reduced).size == (500, 750)
    assert open_image(big, max_pixels=10**8).size == (2000, 3000)  # not asked to reduce
    assert open_image(image_bytes((600, 800)), max_pixels=10**8, reduce_to=448).size == (
        600,
        800,
    )  # under twice the target: decoded whole
    png = image_bytes((2000, 3000), fmt="PNG")
    assert open_image(png, max_pixels=10**8, reduce_to=448).size == (2000, 3000)


def test_the_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    bomb = image_bytes((5000, 5000), fmt="PNG")
    with pytest.raises(PayloadTooLarge, match="CLIP_MAX_IMAGE_PIXELS"):
        open_image(bomb, max_pixels=1_000_000)
