"""Image geometry for the model's input, in Pillow and numpy alone (no torch): what the
decode processes run, so each of them costs tens of megabytes rather than a torch import.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import numpy.typing as npt
import PIL
from PIL import Image

# Beyond this aspect ratio a CLIP "shortest side" resize of a sliver (a 10000x2 strip)
# would allocate hundreds of megabytes for pixels the centre crop throws away. Ordinary
# person crops (1:2, 1:3) stay far below it, so they go through the exact reference path.
_MAX_ASPECT_BEFORE_PRECROP = 4.0

_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


class ResizeCenterCrop:
    """torchvision's Resize(short side) then CenterCrop, computing only the pixels the
    crop keeps.

    PIL resizes in two separable passes, in an order it picks from the sizes. Here the
    first pass, in that same order, runs over only the rows (or columns) the second will
    read; its output is cut to the crop; the second pass computes only the crop's pixels
    (Image.resize's `box`). Each output pixel has the full resize's source centre and
    filter support; the box's float32 coordinates move a rare pixel by 1/255 (tested: at
    most 1, in well under 1% of pixels). A 1:2 person crop resized to 224 x 448 and cut
    to 224 x 224 spent about half its time on rows the crop threw away; resizing is the
    largest cost the service has around the model.
    """

    # PIL's filter supports (Resample.c), in source pixels at scale 1.
    SUPPORT = {
        Image.Resampling.BILINEAR: 1.0,
        Image.Resampling.BICUBIC: 2.0,
        Image.Resampling.LANCZOS: 3.0,
    }

    def __init__(self, side: int, crop: tuple[int, int], resample: Image.Resampling) -> None:
        self.side = side
        self.crop_height, self.crop_width = crop
        self.resample = resample
        self.support = self.SUPPORT[resample]

    def output_size(self, width: int, height: int) -> tuple[int, int] | None:
        """torchvision's resized (width, height), or None where it would pad instead."""
        if width <= height:
            new_width, new_height = self.side, int(self.side * height / width)
        else:
            new_width, new_height = int(self.side * width / height), self.side
        if new_width < self.crop_width or new_height < self.crop_height:
            return None
        return new_width, new_height

    def _span(self, size: int, new_size: int, start: int, count: int) -> tuple[int, int]:
        """Source pixels [first, last) along one axis that output pixels [start, start +
        count) read, with a margin: PIL's window is centre -/+ support, the support
        widened by the scale when shrinking."""
        scale = size / new_size
        support = self.support * max(scale, 1.0)
        first = int((start + 0.5) * scale - support + 0.5) - 2
        last = int((start + count - 0.5) * scale + support + 0.5) + 2
        return max(0, first), min(size, last)

    def placement(self, width: int, height: int) -> tuple[int, int, int, int] | None:
        """(resized width, resized height, crop top, crop left) as torchvision places
        them, or None where it would pad instead."""
        resized = self.output_size(width, height)
        if resized is None:
            return None
        new_width, new_height = resized
        top = round((new_height - self.crop_height) / 2.0)  # torchvision's rounding
        left = round((new_width - self.crop_width) / 2.0)
        return new_width, new_height, top, left

    def __call__(self, image: Image.Image) -> Image.Image | None:
        """The resized and cropped image; None where torchvision would pad instead (a
        crop larger than the resized image), which the caller's full transform does."""
        width, height = image.size
        placement = self.placement(width, height)
        if placement is None:
            return None
        new_width, new_height, top, left = placement
        crop_width, crop_height = self.crop_width, self.crop_height
        scale_x, scale_y = width / new_width, height / new_height
        if (
            new_width != width
            and new_height != height
            and _vertical_first(width, height, new_width, new_height)
        ):
            # As Pillow would for the whole image: the vertical pass (over only the
            # columns the horizontal pass reads, all rows: no box, so exact), cut to
            # the crop's rows, then the horizontal pass for the crop's columns.
            first, last = self._span(width, new_width, left, crop_width)
            columns = image.crop((first, 0, last, height))
            columns = columns.resize((last - first, new_height), self.resample)
            columns = columns.crop((0, top, last - first, top + crop_height))
            kept = (left * scale_x - first, (left + crop_width) * scale_x - first)
            box = (kept[0], 0.0, kept[1], float(crop_height))
            out = columns.resize((crop_width, crop_height), self.resample, box=box)
        else:
            # Horizontal pass first (over only the rows the vertical pass reads), cut to
            # the crop's columns, then the vertical pass for the crop's rows.
            if new_height == height:
                first, last = top, top + crop_height
            else:
                first, last = self._span(height, new_height, top, crop_height)
            rows_kept = image.crop((0, first, width, last))
            if new_width != width:
                rows_kept = rows_kept.resize((new_width, last - first), self.resample)
            out = rows_kept.crop((left, 0, left + crop_width, last - first))
            if new_height != height:
                kept = (top * scale_y - first, (top + crop_height) * scale_y - first)
                box = (0.0, kept[0], float(crop_width), kept[1])
                out = out.resize((crop_width, crop_height), self.resample, box=box)
        return out.convert("RGB") if out.mode != "RGB" else out


def _vertical_first(width: int, height: int, new_width: int, new_height: int) -> bool:
    """Whether Pillow resizes (width, height) to (new_width, new_height) vertical pass
    first: from Pillow 13 it does when the height shrinks by more than twice as many
    pixels as the width (libImaging/Resample.c); before, never."""
    if _PILLOW_MAJOR < 13:
        return False
    shrink = height - new_height
    return shrink > 0 and shrink > 2 * (width - new_width)


def precrop_extreme_aspect(image: Image.Image) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    limit = max(1, int(short * _MAX_ASPECT_BEFORE_PRECROP))
    if long <= limit:
        return image
    if width > height:
        left = (width - limit) // 2
        return image.crop((left, 0, left + limit, height))
    top = (height - limit) // 2
    return image.crop((0, top, width, top + limit))


def shrink_extreme_aspect(image: Image.Image, target: int) -> Image.Image:
    """A sliver whose short side would round to nothing when its long side is fitted to
    `target` is resized here first, keeping one pixel across; open_clip's resize then
    leaves it as it is and pads it. Resizing before padding keeps the memory of a
    40 x 1,000,000 strip at target x 1, where padding first needs gigabytes."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short * target >= long:
        return image
    fitted = (target, 1) if width > height else (1, target)
    return image.resize(fitted, Image.Resampling.BICUBIC)


class PixelPreprocessor:
    """The model's preprocessing for the common case (CLIP's resize and centre crop to
    uint8 pixels) without torch; `fallback` (the full preprocessor, pickled) is loaded on
    first need, for the shapes the fast path does not cover."""

    def __init__(self, fast: ResizeCenterCrop, fallback: bytes) -> None:
        self.fast = fast
        self._fallback_blob = fallback
        self._fallback: Any = None

    def __call__(self, image: Image.Image) -> npt.NDArray[np.uint8]:
        resized = self.fast(precrop_extreme_aspect(image))
        if resized is None:
            if self._fallback is None:  # (start_worker has capped torch's threads)
                self._fallback = pickle.loads(self._fallback_blob)
            return np.asarray(self._fallback(image).numpy())
        return np.ascontiguousarray(np.asarray(resized).transpose(2, 0, 1))
