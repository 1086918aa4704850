"""open_clip's image transform, cut for serving: geometry per image in the decode threads,
normalisation per batch in the forward thread.

Same arithmetic as the model's own transform (tested to the pixel), built from that
transform rather than restated, so a model with other sizes or statistics keeps its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

# Beyond this aspect ratio a CLIP "shortest side" resize of a sliver (a 10000x2 strip)
# would allocate hundreds of megabytes for pixels the centre crop throws away. Ordinary
# person crops (1:2, 1:3) stay far below it, so they go through the exact reference path.
_MAX_ASPECT_BEFORE_PRECROP = 4.0

_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])

_PIL_FILTERS = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


def _is_mode_conversion(step: object) -> bool:
    """open_clip's final "to RGB" step: a class in open_clip 3, a function before."""
    return type(step).__name__ == "MaybeConvertMode" or (
        getattr(step, "__name__", "") == "_convert_to_rgb"
    )


class ResizeCenterCrop:
    """torchvision's Resize(short side) then CenterCrop, computing only the pixels the
    crop keeps.

    PIL resizes in two separable passes, in an order it picks from the sizes. Here the
    first pass, in that same order, runs over only the rows (or columns) the second will
    read; its output is cut to the crop; the second pass computes only the crop's pixels
    (Image.resize's `box`). Each output pixel has the full resize's source centre and
    filter support; the box's float32 coordinates move a rare pixel by 1/255 (tested: at
    most 1, in well under 1% of pixels). A 1:2
    person crop resized to 224 x 448 and cut to 224 x 224 spent about half its time on
    rows the crop threw away; resizing is the largest cost the service has around the
    model.
    """

    # PIL's filter supports (Resample.c), in source pixels at scale 1.
    _SUPPORT = {
        Image.Resampling.BILINEAR: 1.0,
        Image.Resampling.BICUBIC: 2.0,
        Image.Resampling.LANCZOS: 3.0,
    }

    def __init__(self, side: int, crop: tuple[int, int], resample: Image.Resampling) -> None:
        self.side = side
        self.crop_height, self.crop_width = crop
        self.resample = resample
        self.support = self._SUPPORT[resample]

    @classmethod
    def matching(cls, steps: list[Any]) -> ResizeCenterCrop | None:
        """The fast equivalent of `steps`, or None if they are not exactly a short-side
        Resize, a CenterCrop and (optionally) open_clip's mode conversion."""
        if len(steps) not in (2, 3):
            return None
        resize, crop = steps[0], steps[1]
        if type(resize) is not Resize or type(crop) is not CenterCrop:
            return None
        if len(steps) == 3 and not _is_mode_conversion(steps[2]):
            return None
        size = resize.size
        side = size if isinstance(size, int) else size[0] if len(size) == 1 else None
        if side is None or resize.max_size is not None:
            return None
        resample = _PIL_FILTERS.get(resize.interpolation)
        if resample not in cls._SUPPORT:
            return None
        crop_size = crop.size
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        return cls(int(side), (int(crop_size[0]), int(crop_size[1])), resample)

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

    def __call__(self, image: Image.Image, fallback: Callable[[Image.Image], Image.Image]) -> Any:
        width, height = image.size
        resized = self.output_size(width, height)
        if resized is None:
            return fallback(image)
        new_width, new_height = resized
        top = round((new_height - self.crop_height) / 2.0)  # torchvision's rounding
        left = round((new_width - self.crop_width) / 2.0)
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


class SplitPreprocess:
    """open_clip's transform cut in two at its ToTensor step.

    The geometric part (resize, crop or pad, mode) runs per image in the decode threads
    and yields uint8 pixels; ToTensor's scaling and Normalize run once per batch in the
    forward thread (on the GPU when there is one). Same arithmetic as open_clip's, but no
    torch kernels in the decode threads: on a 2-core CPU their thread pools otherwise spin
    against the forward pass's, which measured as a doubling of single-request latency.
    Also sends 4x fewer bytes to the device.
    """

    def __init__(
        self,
        geometry: Callable[[Image.Image], Image.Image],
        normalize: Normalize,
        fast: ResizeCenterCrop | None = None,
    ) -> None:
        self.geometry = geometry
        self.fast = fast
        self.mean = torch.tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def from_transform(cls, transform: Callable[[Image.Image], Any]) -> SplitPreprocess | None:
        steps = list(getattr(transform, "transforms", []))
        names = [type(step).__name__ for step in steps]
        if len(steps) < 2 or names[-2] not in ("ToTensor", "MaybeToTensor"):
            return None
        if not isinstance(steps[-1], Normalize):
            return None
        geometry = steps[:-2]
        return cls(Compose(geometry), steps[-1], ResizeCenterCrop.matching(geometry))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """Geometry only: a (C, H, W) uint8 view of the resized image."""
        fast = self.fast
        resized = fast(image, self.geometry) if fast is not None else self.geometry(image)
        # np.array copies (224x224x3 bytes): torch wants a writable buffer it can own.
        array = np.array(resized.convert("RGB") if resized.mode != "RGB" else resized)
        return torch.from_numpy(array).permute(2, 0, 1)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) on any device to normalised float32, as ToTensor + Normalize."""
        values = batch.to(torch.float32).div_(255)
        return values.sub_(self.mean.to(values.device)).div_(self.std.to(values.device))


class ImagePreprocessor:
    """RGB image -> one model input (C, H, W) on the CPU: uint8 pixels that the forward
    pass normalises (SplitPreprocess.normalize), or, for transforms of unknown shape,
    open_clip's float tensor.

    Picklable and free of model weights: decode processes each hold a copy."""

    def __init__(
        self,
        transform: Callable[[Image.Image], torch.Tensor],
        resize_mode: str,
        image_size: tuple[int, int],
    ) -> None:
        self.transform = transform
        self.resize_mode = resize_mode
        self.side = max(image_size)
        self.split = SplitPreprocess.from_transform(transform)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.resize_mode == "shortest":
            image = precrop_extreme_aspect(image)
        elif self.resize_mode == "longest":
            image = shrink_extreme_aspect(image, self.side)
        if self.split is not None:
            return self.split.pixels(image)
        return self.transform(image)


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
