"""Where the garments are in a standing-person crop, and which pixels to trust.

Vertical split by proportions of the crop height. Defaults follow anthropometric segment
lengths of a standing adult (Drillis & Contini 1966, as tabulated in Winter, "Biomechanics
and Motor Control of Human Movement"): the chin sits at ~0.13 of stature from the top and
the hip joint at ~0.47, the ankle at ~0.96. A detector's box adds a little margin at the
top and bottom, so the boundaries are set at 0.15 (head | upper body), 0.52 (upper |
lower: just below the hip, where trousers start) and 0.92 (lower | feet).

Weights per pixel down-weight what is probably not garment: background (colours seen
on the crop's border, where the person rarely is) and skin (arms, hands). They never
reach zero: on a tight crop the garment touches the border too, and it must still win by
its area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image
from skimage.color import rgb2lab, rgb2ycbcr

from app.config import MIN_PERSON_CROP

DEFAULT_BOUNDS = (0.15, 0.52, 0.92)
MIN_CROP = MIN_PERSON_CROP

_FLOOR = 0.15  # smallest weight a pixel can get
_BACKGROUND_DISTANCE = 18.0  # Delta E (CIE76) under which a pixel looks like the border
_SAMPLE_SIDE = 48  # regions are analysed at most this many pixels wide
_MIN_ACROSS = 8  # ... and at least this many across, where the crop has them


@dataclass(frozen=True)
class Box:
    left: int
    top: int
    right: int
    bottom: int

    @property
    def size(self) -> tuple[int, int]:
        return self.right - self.left, self.bottom - self.top


@dataclass(frozen=True)
class BodyRegions:
    head: Box
    upper: Box
    lower: Box
    feet: Box


def split_body(
    width: int, height: int, bounds: tuple[float, float, float] = DEFAULT_BOUNDS
) -> BodyRegions:
    """Four horizontal bands, each at least one pixel tall (needs height >= 4)."""
    if height < 4 or width < 1:
        raise ValueError(f"a {width}x{height} crop is too small to split")
    cuts = [0, *(round(height * b) for b in bounds), height]
    for i in (1, 2, 3):
        cuts[i] = min(max(cuts[i], cuts[i - 1] + 1), height - (4 - i))
    return BodyRegions(*(Box(0, cuts[i], width, cuts[i + 1]) for i in range(4)))


def garment_weights(
    rgb: npt.NDArray[np.uint8], border_lab: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Per-pixel weight (H, W) for an RGB region, given Lab colours of the crop's border."""
    height, width, _ = rgb.shape
    weights = np.ones((height, width), dtype=np.float64)
    lab = rgb2lab(rgb)
    if len(border_lab):
        distance = np.min(
            np.linalg.norm(lab[:, :, None, :] - border_lab[None, None, :, :], axis=-1), axis=-1
        )
        weights *= np.clip(distance / _BACKGROUND_DISTANCE, _FLOOR, 1.0)
    weights[skin_mask(rgb)] *= 0.25
    # Garments sit in the middle of a person crop; the sides are arms and background.
    x = (np.arange(width) + 0.5) / width - 0.5
    weights *= np.exp(-(x**2) / (2 * 0.3**2))[None, :]
    return np.maximum(weights, _FLOOR * 0.25)


def skin_mask(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Chai & Ngan's (1999) skin cluster in YCbCr: Cb 77-127, Cr 133-173."""
    ycbcr = rgb2ycbcr(rgb)
    cb, cr, luma = ycbcr[..., 1], ycbcr[..., 2], ycbcr[..., 0]
    mask: npt.NDArray[np.bool_] = (cb >= 77) & (cb <= 127) & (cr >= 133) & (cr <= 173) & (luma > 40)
    return mask


def border_colors(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """Lab colours typical of the crop's border: the top edge and the upper corners,
    plus the bottom corners, where a standing person leaves background showing."""
    height, width, _ = rgb.shape
    band = max(1, min(height, width) // 16)
    side = max(1, width // 5)
    patches = [
        rgb[:band, :],  # above the head
        rgb[: height // 3, :band],  # left of the head and shoulders
        rgb[: height // 3, width - band :],  # right of them
        rgb[height - height // 4 :, :side][:, :band],  # lower corners, beside the feet
        rgb[height - height // 4 :, width - side :][:, -band:],
    ]
    samples = [np.median(rgb2lab(p).reshape(-1, 3), axis=0) for p in patches if p.size]
    return np.array(samples, dtype=np.float64)


def downsample(image: Image.Image, side: int = _SAMPLE_SIDE) -> npt.NDArray[np.uint8]:
    """A sample of the crop's own pixels (nearest neighbour: no blended colours) whose
    longer side is at most `side`; colour statistics need a few thousand pixels, not a
    megapixel. A thin crop keeps 8 pixels across where it has them, even if that means
    distorting a sliver's aspect: colours do not care, and memory stays bounded."""
    width, height = image.size
    scale = min(1.0, side / max(width, height))
    size = (
        max(min(width, _MIN_ACROSS), round(width * scale)),
        max(min(height, _MIN_ACROSS), round(height * scale)),
    )
    small = image if size == (width, height) else image.resize(size, Image.Resampling.NEAREST)
    return np.asarray(small.convert("RGB") if small.mode != "RGB" else small)
