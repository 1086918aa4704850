"""Boxes against a frame, without pixels: reading, rounding, clipping, refusals."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from app.errors import PayloadTooLarge, ValidationFailed
from app.inference.frames import box_pixels, fit_boxes, oriented_size, read_boxes


def test_boxes_are_read_in_order_as_floats() -> None:
    assert read_boxes([[1, 2, 3.5, 4], [0, 0, 10, 20]], 8) == [(1, 2, 3.5, 4), (0, 0, 10, 20)]
    assert read_boxes([], 8) == []


def test_more_boxes_than_allowed_is_413_before_any_is_read() -> None:
    with pytest.raises(PayloadTooLarge, match="CLIP_MAX_BATCH_IMAGES"):
        read_boxes(["not even a box"] * 9, 8)


@pytest.mark.parametrize(
    "box", [[1, 2, 3], [1, 2, 3, 4, 5], "1,2,3,4", [1, 2, None, 4], [False, 0, 9, 9], {"x1": 0}]
)
def test_anything_but_four_numbers_is_refused(box: Any) -> None:
    with pytest.raises(ValidationFailed, match=r"^boxes\[1\] must be four numbers"):
        read_boxes([[0, 0, 9, 20], box], 8)


def test_every_bad_box_is_named() -> None:
    with pytest.raises(ValidationFailed) as caught:
        read_boxes([[5, 0, 1, 9], [0, 0, 9, 20], [0, 9, 9, 9], [0, 0, float("nan"), 9]], 8)
    message = str(caught.value)
    assert message.startswith("boxes[0] [5, 0, 1, 9] is empty or reversed")
    assert "also invalid: boxes[2], boxes[3]" in message


def test_floats_are_widened_to_the_pixels_they_touch() -> None:
    assert fit_boxes([(10.2, 20.7, 50.1, 100.9)], 640, 480) == [(10, 20, 51, 101)]
    assert fit_boxes([(10.0, 20.0, 50.0, 100.0)], 640, 480) == [(10, 20, 50, 100)]
    assert fit_boxes([(0, 0, 7.5, 15.1)], 640, 480) == [(0, 0, 8, 16)]  # the minimum, widened


def test_boxes_partly_outside_are_clipped() -> None:
    assert fit_boxes([(-5.5, -1, 30, 500)], 640, 480) == [(0, 0, 30, 480)]


@pytest.mark.parametrize(
    ("box", "words"),
    [
        ((640, 0, 700, 100), "entirely outside the 640x480 frame"),
        ((-50, -50, 0, 0), "entirely outside"),
        ((0, 0, 7, 100), "7x100 pixels"),
        ((636, 0, 700, 100), "4x100 pixels once clipped"),
        ((0, 470, 50, 600), "50x10 pixels once clipped"),
    ],
)
def test_boxes_outside_or_too_small_are_refused(
    box: tuple[float, float, float, float], words: str
) -> None:
    with pytest.raises(ValidationFailed, match=r"^boxes\[0\]") as caught:
        fit_boxes([box], 640, 480)
    assert words in str(caught.value)


def test_box_pixels_add_up() -> None:
    assert box_pixels([(0, 0, 10, 20), (5, 5, 6, 6)]) == 201


@pytest.mark.parametrize(("orientation", "size"), [(1, (60, 40)), (6, (40, 60)), (8, (40, 60))])
def test_the_oriented_size_comes_from_the_header(orientation: int, size: tuple[int, int]) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.new("RGB", (60, 40)).save(buffer, "JPEG", exif=exif.tobytes())
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    assert oriented_size(opened) == size
