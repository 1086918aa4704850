"""Decoding at the trust boundary: every mode to RGB, or a clear client error."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from app.errors import InvalidImage, PayloadTooLarge
from app.inference.decode import decode_image, load_rgb, open_image
from tests.helpers import image_bytes, noise_jpeg

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


def test_a_float_image_with_no_finite_pixel_is_refused() -> None:
    for fill in (np.nan, np.inf):
        data = encoded(Image.fromarray(np.full((32, 16), fill, np.float32)), "TIFF")
        with pytest.raises(InvalidImage, match="every pixel is NaN or infinite"):
            decode_image(data, max_pixels=LIMIT)


def test_a_float_images_nan_pixels_are_black_and_the_rest_kept() -> None:
    pixels = np.full((32, 16), 0.5, np.float32)
    pixels[:8] = np.nan
    grey = np.asarray(decode_image(encoded(Image.fromarray(pixels), "TIFF"), max_pixels=LIMIT))
    assert grey[:8].max() == 0
    assert abs(int(grey[8:].min()) - 128) <= 1


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


def _gradient(size: tuple[int, int] = (24, 40)) -> Image.Image:
    """No two pixels alike along either axis: every flip and turn gives other pixels."""
    x, y = np.meshgrid(np.arange(size[0]), np.arange(size[1]))
    pixels = np.stack([x * 10 % 256, y * 6 % 256, (x + y) * 3 % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_as_pillow_does(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(_gradient(), "PNG", exif=exif)
    reference = Image.open(io.BytesIO(data))
    reference.load()
    expected = np.asarray(ImageOps.exif_transpose(reference).convert("RGB"))
    assert np.array_equal(np.asarray(decode_image(data, max_pixels=LIMIT)), expected)


def test_the_orientation_is_applied_once_to_crops_of_a_decoded_frame() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    frame = load_rgb(open_image(encoded(_gradient(), "PNG", exif=exif), max_pixels=LIMIT))
    assert frame.size == (40, 24)
    crop = frame.crop((4, 2, 30, 20))  # inherits the frame's metadata
    assert np.array_equal(np.asarray(load_rgb(crop)), np.asarray(crop))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_an_unreadable_exif_block_is_no_orientation_not_a_refusal(fmt: str) -> None:
    # A block that is not TIFF at all: Pillow's getexif() raises on it ("not a TIFF
    # file"), and exif_transpose with it.
    picture = _gradient()
    data = encoded(picture, fmt, exif=b"Exif\x00\x00garbage")
    plain = decode_image(encoded(picture, fmt), max_pixels=LIMIT)
    assert np.array_equal(np.asarray(decode_image(data, max_pixels=LIMIT)), np.asarray(plain))


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
        # The base64 where the file's bytes were due (curl -F "image=$B"), or a data: URL.
        (base64.b64encode(image_bytes(fmt="JPEG")), "it is base64 text"),
        (base64.encodebytes(image_bytes(fmt="PNG")), "it is base64 text"),
        (b"data:image/png;base64," + base64.b64encode(image_bytes(fmt="PNG")), "base64 text"),
        (b"helloIamNotAnImageButAsciiText", "not a decodable image; send JPEG"),
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


def pillow_rgb(data: bytes) -> np.ndarray:
    """What Pillow alone decodes (and orients) from `data`: the reference."""
    image = Image.open(io.BytesIO(data))
    image.load()
    image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"))


def jpeg_corpus() -> list[tuple[str, bytes]]:
    """JPEGs as encoders write them: every chroma subsampling, grey, progressive,
    restart markers, optimised tables, every EXIF orientation, odd sizes."""
    rng = np.random.default_rng(3)
    photo = np.cumsum(rng.integers(0, 12, size=(157, 61, 3)), axis=1).astype(np.uint8)
    picture = Image.fromarray(photo)
    cases = [
        (
            f"subsampling {sub}, q{quality}",
            encoded(picture, "JPEG", quality=quality, subsampling=sub),
        )
        for sub in (0, 1, 2)
        for quality in (35, 90)
    ]
    cases += [
        ("grey", encoded(picture.convert("L"), "JPEG")),
        ("progressive", encoded(picture, "JPEG", progressive=True)),
        ("optimised", encoded(picture, "JPEG", optimize=True)),
        ("restart markers", encoded(picture, "JPEG", restart_marker_blocks=1)),
        ("1x1", encoded(Image.new("RGB", (1, 1), (9, 99, 199)), "JPEG")),
    ]
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        cases.append((f"orientation {orientation}", encoded(picture, "JPEG", exif=exif)))
    return cases


@pytest.mark.parametrize(("name", "data"), jpeg_corpus(), ids=[n for n, _ in jpeg_corpus()])
def test_jpegs_decode_to_the_same_pixels_as_pillow(name: str, data: bytes) -> None:
    decoded = decode_image(data, max_pixels=LIMIT)
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), pillow_rgb(data))


@pytest.mark.parametrize("size", [(2000, 3000), (2001, 2999), (897, 1793), (4000, 1000)])
def test_large_jpegs_decode_at_reduced_scale_to_pillows_pixels(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(size[0])
    pixels = np.cumsum(rng.integers(0, 9, (size[1], size[0], 3)), axis=1).astype(np.uint8)
    data = encoded(Image.fromarray(pixels), "JPEG", quality=85)
    reference = open_image(data, max_pixels=10**8, reduce_to=224)
    reference.load()
    decoded = load_rgb(open_image(data, max_pixels=10**8, reduce_to=224))
    assert decoded.size == reference.size
    assert decoded.size[0] < size[0]  # the DCT scaling did happen
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(reference.convert("RGB")))


def test_a_large_jpeg_cut_short_is_refused_at_reduced_scale_too() -> None:
    data = cut_then_closed(
        encoded(Image.effect_noise((1200, 2400), 60).convert("RGB"), "JPEG"), 0.5
    )
    with pytest.raises(InvalidImage, match=r"truncated or corrupt.*premature end"):
        load_rgb(open_image(data, max_pixels=10**8, reduce_to=224))


def cut_then_closed(data: bytes, keep: float) -> bytes:
    """A JPEG cut inside its scan data, with its end-of-image marker put back: Pillow
    fills what is missing with grey and raises nothing."""
    scan = data.index(b"\xff\xda")
    return data[: scan + int((len(data) - scan) * keep)] + b"\xff\xd9"


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9])
def test_a_jpeg_cut_short_is_refused_even_when_it_ends_with_an_end_marker(keep: float) -> None:
    data = cut_then_closed(noise_jpeg(4, (120, 240)), keep)
    pillow_rgb(data)  # Pillow alone: no error
    with pytest.raises(InvalidImage, match=r"truncated or corrupt.*premature end"):
        decode_image(data, max_pixels=LIMIT)


def test_jpeg_damage_that_leaves_the_pixels_whole_is_tolerated() -> None:
    """Stray bytes between the scan and its end marker: libjpeg warns, the picture is
    intact; decoded as Pillow decodes it."""
    data = noise_jpeg(5)
    padded = data[:-2] + b"\x00" * 7 + data[-2:]
    np.testing.assert_array_equal(
        np.asarray(decode_image(padded, max_pixels=LIMIT)), pillow_rgb(data)
    )


def test_a_span_of_scan_data_overwritten_is_refused() -> None:
    """Found from outside: 200 bytes mid-scan overwritten decode to garbage in every
    row, with hundreds of bytes left before the end marker; Pillow raised nothing."""
    noise = np.random.default_rng(0).random((256, 128, 3)) * 255
    damaged = bytearray(encoded(Image.fromarray(noise.astype(np.uint8)), "JPEG"))
    damaged[1000:1200] = b"\xab" * 200
    pillow_rgb(bytes(damaged))  # Pillow alone: no error
    with pytest.raises(InvalidImage, match=r"corrupt.*bytes short of its end"):
        decode_image(bytes(damaged), max_pixels=LIMIT)


@pytest.mark.parametrize(("padding", "refused"), [(16, False), (66, False), (120, True)])
def test_padding_before_the_end_marker_is_bounded(padding: int, refused: bool) -> None:
    """libjpeg counts what its bit buffer has not taken: 66 bytes of padding are 64."""
    data = noise_jpeg(5)
    padded = data[:-2] + b"\x00" * padding + data[-2:]
    if refused:
        with pytest.raises(InvalidImage):
            decode_image(padded, max_pixels=LIMIT)
    else:
        np.testing.assert_array_equal(
            np.asarray(decode_image(padded, max_pixels=LIMIT)), pillow_rgb(data)
        )


def test_thirty_two_bit_integers_are_scaled_by_their_range_not_clipped() -> None:
    """A full-range 32-bit TIFF was divided by 257 as if 16-bit, then clipped: white."""
    ramp = np.linspace(0, 2**31 - 1, 64 * 32).reshape(64, 32).astype(np.int32)
    image = decode_image(encoded(Image.fromarray(ramp), "TIFF"), max_pixels=LIMIT)
    grey = np.asarray(image)[:, :, 0]
    assert grey.min() == 0
    assert grey.max() == 255
    assert 120 <= int(np.median(grey)) <= 135  # a ramp keeps its middle grey


def test_mode_i_within_sixteen_bits_is_still_read_as_sixteen_bit() -> None:
    pixels = np.full((8, 8), 32768, dtype=np.int32)  # 16-bit mid grey held in mode I
    image = decode_image(encoded(Image.fromarray(pixels), "TIFF"), max_pixels=LIMIT)
    assert abs(int(np.asarray(image)[0, 0, 0]) - 128) <= 1


def test_cmyk_jpegs_still_decode_through_pillow() -> None:
    cmyk = encoded(Image.new("CMYK", (32, 48), (0, 255, 255, 0)), "JPEG")
    red = np.asarray(decode_image(cmyk, max_pixels=LIMIT))[10, 10]
    assert red[0] > 200
    assert red[1] < 60
    np.testing.assert_array_equal(
        np.asarray(decode_image(cmyk, max_pixels=LIMIT)), pillow_rgb(cmyk)
    )
