"""Whole frames with a detector's boxes: the boxes checked against the frame, and crops cut
from it exactly as a client would cut them.

Boxes are `[x1, y1, x2, y2]` in the pixels of the frame as decoded, EXIF orientation
applied. Float boxes are widened to whole pixels (x1, y1 floored; x2, y2 ceiled), so a
box never loses a pixel it touches; boxes partly outside are clipped to the frame. The
crop of a box is then `frame.crop(box)`: the same pixels a client would send to /embed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from PIL import Image

from app.config import MIN_PERSON_CROP as MIN_CROP
from app.errors import PayloadTooLarge, ValidationFailed
from app.inference.decode import exif_orientation

FloatBox = tuple[float, float, float, float]
Box = tuple[int, int, int, int]

# EXIF orientations 5-8 turn the picture a quarter: the decoded frame is the header's
# height wide.
_QUARTER_TURNS = {5, 6, 7, 8}


def read_boxes(raw: Any, max_boxes: int) -> list[FloatBox]:
    """The boxes a client sent, as numbers in order; 413 past `max_boxes`, 422 naming the
    first bad box (and how many others are bad) otherwise. Needs no pixels."""
    if not isinstance(raw, list):
        raise ValidationFailed(
            f"boxes must be a JSON list of [x1, y1, x2, y2] boxes, got {_shown(raw)}"
        )
    if len(raw) == 4 and all(_is_number(v) for v in raw):
        raise ValidationFailed(
            f"boxes must be a list of boxes, [[x1, y1, x2, y2], ...]; got one box without "
            f"the outer list: {_shown(raw)}"
        )
    if len(raw) > max_boxes:
        raise PayloadTooLarge(
            f"{len(raw)} boxes in one frame, over the limit of {max_boxes} "
            "(CLIP_MAX_BATCH_IMAGES); split them over several requests"
        )
    boxes: list[FloatBox] = []
    problems: list[tuple[int, str]] = []
    for index, item in enumerate(raw):
        box, problem = _read_box(item)
        if problem:
            problems.append((index, problem))
        elif box is not None:
            boxes.append(box)
    if problems:
        raise ValidationFailed(_summary(problems))
    return boxes


def fit_boxes(boxes: Sequence[FloatBox], width: int, height: int) -> list[Box]:
    """Whole-pixel boxes clipped to a `width` x `height` frame; 422 naming the first box
    that lies outside it or is smaller than a person crop can be once clipped."""
    fitted: list[Box] = []
    problems: list[tuple[int, str]] = []
    for index, (x1, y1, x2, y2) in enumerate(boxes):
        left, top = math.floor(x1), math.floor(y1)
        right, bottom = math.ceil(x2), math.ceil(y2)
        if right <= 0 or bottom <= 0 or left >= width or top >= height:
            problems.append(
                (
                    index,
                    f"{_numbers((x1, y1, x2, y2))} lies entirely outside the {width}x{height} "
                    "frame (coordinates are pixels of the frame as decoded, EXIF "
                    "orientation applied)",
                )
            )
            continue
        box = (max(left, 0), max(top, 0), min(right, width), min(bottom, height))
        box_width, box_height = box[2] - box[0], box[3] - box[1]
        if box_width < MIN_CROP[0] or box_height < MIN_CROP[1]:
            problems.append(
                (
                    index,
                    f"is {box_width}x{box_height} pixels once clipped to the {width}x{height} "
                    f"frame; a person box needs at least {MIN_CROP[0]}x{MIN_CROP[1]}",
                )
            )
            continue
        fitted.append(box)
    if problems:
        raise ValidationFailed(_summary(problems))
    return fitted


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """The size an opened (not yet decoded) image will have once EXIF orientation is
    applied, read from its header."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in _QUARTER_TURNS else (width, height)


def box_pixels(boxes: Sequence[Box]) -> int:
    return sum((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in boxes)


def _read_box(item: Any) -> tuple[FloatBox | None, str | None]:
    if not isinstance(item, list | tuple) or len(item) != 4:
        return None, f"must be four numbers [x1, y1, x2, y2], got {_shown(item)}"
    if not all(_is_number(v) for v in item):
        return None, f"must be four numbers [x1, y1, x2, y2], got {_shown(item)}"
    try:
        x1, y1, x2, y2 = (float(v) for v in item)
    except OverflowError:  # JSON integers have no size limit; floats do
        x1 = y1 = x2 = y2 = math.inf
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, f"has a value that is not a finite number: {_shown(item)}"
    if x2 <= x1 or y2 <= y1:
        return None, (
            f"{_numbers((x1, y1, x2, y2))} is empty or reversed: it needs x2 > x1 and "
            "y2 > y1 ([left, top, right, bottom])"
        )
    return (x1, y1, x2, y2), None


def _summary(problems: list[tuple[int, str]]) -> str:
    """The first bad box in full, the others by index."""
    index, message = problems[0]
    text = f"boxes[{index}] {message}"
    if len(problems) > 1:
        others = ", ".join(f"boxes[{i}]" for i, _ in problems[1:6])
        more = ", ..." if len(problems) > 6 else ""
        text += f" (also invalid: {others}{more})"
    return text


def _numbers(box: FloatBox) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """`value` as the client wrote it: JSON, not Python's repr."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
