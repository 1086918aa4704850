"""One crop to an outfit descriptor: garment types from the shared forward pass,
colours in a thread of their own.

Cost of one /analyze: two images in the batcher (the upper- and lower-body crops), plus
the whole crop when the embedding is asked for. They join whatever batch is forming, so
under load they share forward passes with /embed traffic. The decode thread only cuts
and resizes (`prepare`); the colour analysis (`colors`, the ~15 ms of k-means) runs
elsewhere, while the forward pass runs, so a burst of /analyze never stalls the decoding
of /embed's images.

Every step resizes before it copies or pads: the region crops are resized straight out
of the decoded image into the model's input square, and colours are read from a sample of
at most 48 x 48 pixels, so neither memory nor time depends on the crop's aspect ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from app.analysis.colors import ColorShare, dominant_colors
from app.analysis.garments import GarmentClassifiers, GarmentPrediction
from app.analysis.regions import (
    MIN_CROP,
    Box,
    border_colors,
    downsample,
    garment_weights,
    split_body,
)
from app.errors import ValidationFailed
from app.inference.encoder import ModelInput


@dataclass(frozen=True)
class GarmentDescription:
    type: str
    type_score: float
    color: str
    colors: list[ColorShare]


@dataclass(frozen=True)
class Outfit:
    top: GarmentDescription
    bottom: GarmentDescription
    embedding: npt.NDArray[np.float32] | None


@dataclass(frozen=True)
class PreparedCrop:
    """What the decode thread hands on: model inputs and a small sample for colours."""

    model_inputs: list[ModelInput]  # upper crop, lower crop, [whole crop]
    sample: npt.NDArray[np.uint8]  # the crop, at most 48 pixels on its long side
    include_embedding: bool


Colors = tuple[list[ColorShare], list[ColorShare]]  # upper body, lower body


class OutfitAnalyzer:
    def __init__(
        self,
        classifiers: GarmentClassifiers,
        preprocess: Callable[[Image.Image], ModelInput],
        bounds: tuple[float, float, float],
        input_side: int,
    ) -> None:
        self.classifiers = classifiers
        self._preprocess = preprocess
        self._bounds = bounds
        self._input_side = input_side  # the model's input square

    def prepare(self, image: Image.Image, include_embedding: bool) -> PreparedCrop:
        """Decode thread: the model inputs and the colour sample, nothing more."""
        width, height = image.size
        if width < MIN_CROP[0] or height < MIN_CROP[1]:
            raise ValidationFailed(
                f"crop is {width}x{height} pixels; /analyze needs at least "
                f"{MIN_CROP[0]}x{MIN_CROP[1]} to find garments (/embed takes any size)"
            )
        regions = split_body(width, height, self._bounds)
        inputs = [
            self._preprocess(_fit_square(image, box, self._input_side))
            for box in (regions.upper, regions.lower)
        ]
        if include_embedding:
            inputs.append(self._preprocess(image))
        return PreparedCrop(inputs, downsample(image), include_embedding)

    def colors(self, prepared: PreparedCrop) -> Colors:
        """Colour thread: named colours of the upper and lower body."""
        return sample_colors(prepared.sample, self._bounds)

    def finish(
        self, prepared: PreparedCrop, rows: Sequence[npt.NDArray[np.float32]], colors: Colors
    ) -> Outfit:
        top = self.classifiers.top.predict(rows[0])
        bottom = self.classifiers.bottom.predict(rows[1])
        return Outfit(
            top=_describe(top, colors[0]),
            bottom=_describe(bottom, colors[1]),
            embedding=rows[2] if prepared.include_embedding else None,
        )


def garment_colors(image: Image.Image, bounds: tuple[float, float, float]) -> Colors:
    """Named colours of the upper and lower body of an RGB crop (at least 4 px tall)."""
    return sample_colors(downsample(image), bounds)


def sample_colors(small: npt.NDArray[np.uint8], bounds: tuple[float, float, float]) -> Colors:
    """Named colours of the upper and lower body of a downsampled crop."""
    border = border_colors(small)
    regions = split_body(small.shape[1], small.shape[0], bounds)
    upper, lower = _slice(small, regions.upper), _slice(small, regions.lower)
    return (
        dominant_colors(upper, garment_weights(upper, border)),
        dominant_colors(lower, garment_weights(lower, border)),
    )


def _describe(prediction: GarmentPrediction, colors: list[ColorShare]) -> GarmentDescription:
    return GarmentDescription(
        type=prediction.label,
        type_score=prediction.score,
        color=colors[0].name if colors else "unknown",
        colors=colors,
    )


def _slice(pixels: npt.NDArray[np.uint8], box: Box) -> npt.NDArray[np.uint8]:
    return pixels[box.top : box.bottom, box.left : box.right]


def _fit_square(image: Image.Image, box: Box, side: int) -> Image.Image:
    """The region resized to fit a `side` square and centred on black, so CLIP's centre
    crop keeps all of it. Resized straight from the decoded image (no crop copy), and
    before padding, so a 40 x 1,000,000 strip costs a 224 x 224 canvas, not a square of
    its long side."""
    width, height = box.size
    scale = side / max(width, height)
    fitted = (max(1, min(side, round(width * scale))), max(1, min(side, round(height * scale))))
    region = image.resize(
        fitted, Image.Resampling.BICUBIC, box=(box.left, box.top, box.right, box.bottom)
    )
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(region, ((side - fitted[0]) // 2, (side - fitted[1]) // 2))
    return canvas
