"""Colour naming and dominant colours."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.analysis.analyzer import garment_colors
from app.analysis.colors import BASIC_COLORS, dominant_colors, name_rgb, weighted_kmeans
from app.analysis.regions import DEFAULT_BOUNDS
from app.tools.synthetic_people import make_person


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((0, 0, 128), "blue"),  # navy is blue, not black
        ((15, 20, 60), "blue"),  # navy in shadow
        ((0, 90, 0), "green"),  # bottle green
        ((120, 10, 20), "red"),  # maroon
        ((250, 250, 250), "white"),
        ((190, 190, 196), "white"),  # a white shirt in shade stays white
        ((128, 128, 128), "gray"),
        ((20, 20, 22), "black"),
        ((255, 140, 0), "orange"),
        ((250, 230, 40), "yellow"),
        ((120, 40, 150), "purple"),
        ((255, 170, 190), "pink"),
        ((110, 70, 35), "brown"),
    ],
)
def test_basic_colour_terms(rgb: tuple[int, int, int], name: str) -> None:
    assert name_rgb(rgb) == name


def test_every_name_is_a_basic_colour_term() -> None:
    rng = np.random.default_rng(0)
    names = {name_rgb(tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(300)}
    assert names <= set(BASIC_COLORS)
    assert len(names) >= 9


def test_weights_decide_which_colour_dominates() -> None:
    region = np.zeros((20, 20, 3), dtype=np.uint8)
    region[:, :12] = (200, 30, 30)  # 60 % red
    region[:, 12:] = (30, 30, 200)  # 40 % blue
    even = dominant_colors(region, np.ones((20, 20)))
    assert [share.name for share in even] == ["red", "blue"]
    assert even[0].fraction == pytest.approx(0.6, abs=0.01)
    assert sum(share.fraction for share in even) == pytest.approx(1.0, abs=1e-6)
    weights = np.ones((20, 20))
    weights[:, :12] = 0.1  # the red is background
    assert dominant_colors(region, weights)[0].name == "blue"


def test_shares_report_their_mean_colour_as_hex() -> None:
    region = np.full((8, 8, 3), (30, 60, 150), dtype=np.uint8)
    (share,) = dominant_colors(region, np.ones((8, 8)))
    assert share.name == "blue"
    assert share.rgb == "#1e3c96"
    assert share.fraction == pytest.approx(1.0)


def test_kmeans_is_reproducible() -> None:
    rng = np.random.default_rng(1)
    points = rng.normal(size=(500, 3)) * 10
    weights = rng.uniform(0.1, 1.0, 500)
    first = weighted_kmeans(points, weights, 4)
    second = weighted_kmeans(points.copy(), weights.copy(), 4)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_synthetic_people_colours_are_named_right_95_percent_of_the_time() -> None:
    """300 crops (600 garments) of app/tools/synthetic_people.py: CSS-named garment colours,
    random backgrounds, uneven light, folds, noise, JPEG quality 60-95."""
    rng = np.random.default_rng(2026)
    right = total = 0
    misses: list[tuple[str, str]] = []
    for _ in range(300):
        person = make_person(rng)
        image = Image.open(io.BytesIO(person.jpeg)).convert("RGB")
        top, bottom = garment_colors(image, DEFAULT_BOUNDS)
        for truth, found in ((person.top, top[0].name), (person.bottom, bottom[0].name)):
            total += 1
            right += truth == found
            if truth != found:
                misses.append((truth, found))
    accuracy = right / total
    print(f"colour naming: {right}/{total} = {accuracy:.3f}; misses {misses}")
    assert accuracy >= 0.95, misses
