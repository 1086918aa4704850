"""open_clip's image transform, cut for serving: geometry per image in the decode threads,
normalisation per batch in the forward thread.

Same arithmetic as the model's own transform (tested: identical, or one 1/255 step in a
rare pixel where ResizeCenterCrop computes only the kept region), built from that
transform rather than restated, so a model with other sizes or statistics keeps its own.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

from app.inference.geometry import (
    PixelPreprocessor,
    ResizeCenterCrop,
    precrop_extreme_aspect,
    shrink_extreme_aspect,
)

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


def fast_resize_center_crop(steps: list[Any]) -> ResizeCenterCrop | None:
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
    if resample not in ResizeCenterCrop.SUPPORT:
        return None
    crop_size = crop.size
    if isinstance(crop_size, int):
        crop_size = (crop_size, crop_size)
    return ResizeCenterCrop(int(side), (int(crop_size[0]), int(crop_size[1])), resample)


# torch's uint8 kernels for Pillow's antialiased filters (vectorised with AVX2; without
# it, torch's generic path). Against Pillow, measured over shapes from 1/5x to 5x on
# noise, the hardest case: bilinear within 1/255 at every scale, bicubic within 2/255
# where it enlarges or shrinks 3x or more. Shrinking bicubic by 1-3x its weights lose
# precision and noise-like detail lands up to ~20/255 off: Pillow resizes those.
_TORCH_FILTERS = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}
_BICUBIC_SHRINK_LEFT_TO_PILLOW = (1.0, 3.0)
# torch reads a copy of the pixels: beyond this (a 2000 x 2000 crop), the copy would cost
# more memory (up to 120 MB a decode thread at CLIP_MAX_IMAGE_PIXELS) than the resize
# saves time; Pillow resizes those in place.
_MOST_PIXELS_COPIED = 4_000_000


class VectorisedResizeCenterCrop:
    """ResizeCenterCrop's pixels from torch's uint8 resize: 2-3x less CPU than Pillow's
    on a person crop (0.36 against 0.72 ms at 128x256, 0.66 against 2.0 at 300x700), and
    the service's largest cost around the model. Runs in the decode threads: the kernel
    is single-threaded, so no torch thread pool wakes to fight the forward pass."""

    def __init__(self, geometry: ResizeCenterCrop) -> None:
        self.geometry = geometry
        self.mode = _TORCH_FILTERS.get(geometry.resample)

    def __call__(self, image: Image.Image) -> torch.Tensor | None:
        """(C, H, W) uint8, or None where Pillow's path must do it (padding, a filter
        or a scale torch does not match Pillow at, an image not in RGB, a huge one)."""
        width, height = image.size
        placement = self.geometry.placement(width, height)
        if self.mode is None or placement is None or image.mode != "RGB":
            return None
        if width * height > _MOST_PIXELS_COPIED:
            return None
        new_width, new_height, top, left = placement
        shrink = width / new_width
        low, high = _BICUBIC_SHRINK_LEFT_TO_PILLOW
        if self.mode == "bicubic" and low < shrink < high:
            return None
        # np.array copies, writable: torch wants a buffer it may own.
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
        if (new_width, new_height) != (width, height):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(new_height, new_width), mode=self.mode, antialias=True
            )
        crop_height, crop_width = self.geometry.crop_height, self.geometry.crop_width
        return pixels[0, :, top : top + crop_height, left : left + crop_width].contiguous()


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
        self.vectorised = VectorisedResizeCenterCrop(fast) if fast is not None else None
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
        return cls(Compose(geometry), steps[-1], fast_resize_center_crop(geometry))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """Geometry only: a (C, H, W) uint8 view of the resized image."""
        if self.vectorised is not None:
            pixels = self.vectorised(image)
            if pixels is not None:
                return pixels
        resized = self.fast(image) if self.fast is not None else None
        if resized is None:
            resized = self.geometry(image)
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

    def for_processes(self) -> Callable[[Image.Image], Any]:
        """What a decode process should hold: the torch-free PixelPreprocessor where the
        fast path covers this transform, else this preprocessor itself."""
        split = self.split
        if self.resize_mode != "shortest" or split is None or split.fast is None:
            return self
        return PixelPreprocessor(split.fast, pickle.dumps(self))
