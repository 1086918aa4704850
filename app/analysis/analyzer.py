"""One crop to an outfit descriptor: colours in the decode thread, types from the
shared forward pass.

Cost of one /analyze: two images in the batcher (the upper- and lower-body crops), plus
the whole crop when the embedding is asked for. They join whatever batch is forming, so
under load they share forward passes with /embed traffic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
    """What the decode thread hands on: model inputs and the finished colour analysis."""

    model_inputs: list[Any]  # upper crop, lower crop, [whole crop]
    top_colors: list[ColorShare]
    bottom_colors: list[ColorShare]
    include_embedding: bool


class OutfitAnalyzer:
    def __init__(
        self,
        classifiers: GarmentClassifiers,
        preprocess: Callable[[Image.Image], Any],
        bounds: tuple[float, float, float],
    ) -> None:
        self.classifiers = classifiers
        self._preprocess = preprocess
        self._bounds = bounds

    def prepare(self, image: Image.Image, include_embedding: bool) -> PreparedCrop:
        width, height = image.size
        if width < MIN_CROP[0] or height < MIN_CROP[1]:
            raise ValidationFailed(
                f"crop is {width}x{height} pixels; /analyze needs at least "
                f"{MIN_CROP[0]}x{MIN_CROP[1]} to find garments (/embed takes any size)"
            )
        regions = split_body(width, height, self._bounds)
        inputs = [self._preprocess(_square(image, box)) for box in (regions.upper, regions.lower)]
        if include_embedding:
            inputs.append(self._preprocess(image))

        top_colors, bottom_colors = garment_colors(image, self._bounds)
        return PreparedCrop(inputs, top_colors, bottom_colors, include_embedding)

    def finish(self, prepared: PreparedCrop, rows: Sequence[npt.NDArray[np.float32]]) -> Outfit:
        top = self.classifiers.top.predict(rows[0])
        bottom = self.classifiers.bottom.predict(rows[1])
        return Outfit(
            top=_describe(top, prepared.top_colors),
            bottom=_describe(bottom, prepared.bottom_colors),
            embedding=rows[2] if prepared.include_embedding else None,
        )


def garment_colors(
    image: Image.Image, bounds: tuple[float, float, float]
) -> tuple[list[ColorShare], list[ColorShare]]:
    """Named colours of the upper and lower body of an RGB crop (at least 4 px tall)."""
    small = downsample(np.asarray(image))
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


def _square(image: Image.Image, box: Box) -> Image.Image:
    """The region padded to a square with black, so CLIP's centre crop keeps all of it."""
    region = image.crop((box.left, box.top, box.right, box.bottom))
    side = max(region.size)
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(region, ((side - region.size[0]) // 2, (side - region.size[1]) // 2))
    return canvas
