"""Sizes read from headers without Pillow agree with Pillow, or defer to it."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from app.errors import PayloadTooLarge, ServiceError
from app.inference.decode import decoded_pixels, open_image
from app.inference.headers import header_size


def encoded(width: int, height: int, kind: str, **options: object) -> bytes:
    rng = np.random.default_rng(width * 7919 + height)
    mode = "L" if options.pop("gray", False) else "RGB"
    shape = (height, width) if mode == "L" else (height, width, 3)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


SHAPES = [(1, 1), (7, 3), (128, 256), (300, 90), (448, 448), (449, 1000), (1795, 1000)]
SHAPES += [(3601, 1801), (900, 7300)]


@pytest.mark.parametrize(("width", "height"), SHAPES)
@pytest.mark.parametrize(
    "options",
    [
        {"kind": "JPEG"},
        {"kind": "JPEG", "progressive": True},
        {"kind": "JPEG", "gray": True, "exif": Image.Exif()},
        {"kind": "PNG"},
    ],
)
def test_charged_pixels_are_what_pillow_decodes(
    width: int, height: int, options: dict[str, object]
) -> None:
    options = dict(options)
    data = encoded(width, height, str(options.pop("kind")), **options)
    for reduce_to in (None, 224, 448, 100):
        image = open_image(data, max_pixels=10**9, reduce_to=reduce_to)
        expected = image.size[0] * image.size[1]
        assert decoded_pixels(data, max_pixels=10**9, reduce_to=reduce_to) == expected
        image.load()  # and what the decoder really produces
        assert image.size[0] * image.size[1] == expected
    kind, *size = header_size(data) or ("?", 0, 0)
    assert (kind, tuple(size)) == (Image.open(io.BytesIO(data)).format, (width, height))


def test_formats_it_does_not_read_go_to_pillow() -> None:
    for kind in ("WEBP", "BMP", "GIF", "TIFF"):
        data = encoded(40, 30, kind)
        assert header_size(data) is None
        assert decoded_pixels(data, max_pixels=10**6) == 1200
    first, second = (Image.new("RGB", (64, 48), colour) for colour in ("red", "blue"))
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second])
    assert header_size(buffer.getvalue()) is None  # a multi-picture file: Pillow's rules


def test_an_image_over_the_pixel_limit_is_refused_from_its_header() -> None:
    data = encoded(300, 200, "PNG")
    with pytest.raises(PayloadTooLarge, match="300x200"):
        decoded_pixels(data, max_pixels=50_000)
    jpeg = encoded(300, 200, "JPEG")
    with pytest.raises(PayloadTooLarge, match="300x200"):
        decoded_pixels(jpeg, max_pixels=50_000)


def test_every_truncation_of_a_real_file_is_read_or_deferred_never_misread() -> None:
    for data in (encoded(320, 240, "JPEG", exif=Image.Exif()), encoded(320, 240, "PNG")):
        for length in range(len(data) // 4):
            header = header_size(data[:length])
            assert header is None or header[1:] == (320, 240)


@settings(max_examples=400, deadline=None)
@given(
    prefix=st.sampled_from([b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b""]),
    body=st.binary(max_size=200),
)
def test_hostile_bytes_never_raise_from_the_reader(prefix: bytes, body: bytes) -> None:
    header = header_size(prefix + body)
    if header is not None:
        assert min(header[1:]) > 0
    # Pillow's verdict on what the reader deferred, or the pixel limit: a client error
    with contextlib.suppress(ServiceError):
        decoded_pixels(prefix + body, max_pixels=10**6, reduce_to=224)
