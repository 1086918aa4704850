"""Body regions and garment weights."""

from __future__ import annotations

import numpy as np
import pytest

from app.analysis.regions import border_colors, garment_weights, skin_mask, split_body


def test_default_split_follows_body_proportions() -> None:
    regions = split_body(100, 200)
    assert (regions.head.top, regions.head.bottom) == (0, 30)
    assert (regions.upper.top, regions.upper.bottom) == (30, 104)
    assert (regions.lower.top, regions.lower.bottom) == (104, 184)
    assert (regions.feet.top, regions.feet.bottom) == (184, 200)
    assert all(box.size[0] == 100 for box in (regions.head, regions.feet))


@pytest.mark.parametrize(("width", "height"), [(1, 4), (3, 5), (500, 16), (8, 16), (2, 4000)])
def test_every_band_has_pixels_whatever_the_shape(width: int, height: int) -> None:
    regions = split_body(width, height)
    boxes = (regions.head, regions.upper, regions.lower, regions.feet)
    assert all(box.size[1] >= 1 for box in boxes)
    assert [b.top for b in boxes[1:]] == [b.bottom for b in boxes[:-1]]
    assert boxes[-1].bottom == height


def test_too_small_to_split_is_an_error() -> None:
    with pytest.raises(ValueError, match="too small"):
        split_body(10, 3)


def test_skin_tones_are_found_and_garment_colours_are_not() -> None:
    skin = np.array([[(234, 192, 160), (198, 134, 96), (141, 85, 54)]], dtype=np.uint8)
    cloth = np.array([[(30, 60, 150), (20, 120, 40), (128, 128, 128)]], dtype=np.uint8)
    assert skin_mask(skin).all()
    assert not skin_mask(cloth).any()


def test_background_seen_on_the_border_is_down_weighted() -> None:
    crop = np.full((64, 32, 3), (40, 160, 60), dtype=np.uint8)  # green wall
    crop[10:60, 8:24] = (30, 40, 160)  # a blue person in the middle
    border = border_colors(crop)
    weights = garment_weights(crop[20:40], border)
    assert weights[:, 16].mean() > 3 * weights[:, 2].mean()
    assert weights.min() > 0  # never zero: tight crops touch the border
