"""Which crops int8 calibrates on, and how that set names itself in the cache key."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.inference.calibration import (
    FEW_FOLDER_IMAGES,
    MAX_FOLDER_IMAGES,
    SYNTHETIC_IMAGES,
    calibration_for,
)


def mean_colour(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
    return pixels.mean((0, 1)).reshape(3, 1, 1)


def test_the_default_set_is_the_same_synthetic_people_every_time() -> None:
    first, second = calibration_for("", mean_colour), calibration_for("", mean_colour)
    assert first.key == second.key == f"synthetic{SYNTHETIC_IMAGES}"
    pixels = first.pixels()
    assert pixels.shape == (SYNTHETIC_IMAGES, 3, 1, 1)
    assert torch.equal(pixels, second.pixels())
    assert pixels.std(0).min() > 0  # varied people, not one image repeated


def test_a_large_folder_is_sampled_across_its_whole_span(tmp_path: Path) -> None:
    count = MAX_FOLDER_IMAGES * 2 + 5
    for index in range(count):
        red = round(255 * index / (count - 1))
        Image.new("RGB", (4, 8), (red, 0, 0)).save(tmp_path / f"{index:04d}.png")
    calibration = calibration_for(str(tmp_path), mean_colour)
    reds = calibration.pixels()[:, 0, 0, 0]
    assert len(reds) == MAX_FOLDER_IMAGES
    assert reds[0] == 0  # the first file and the last both represented
    assert reds[-1] > 250
    assert calibration.key.startswith(f"own{MAX_FOLDER_IMAGES}-")


def test_changing_a_crop_changes_the_key(tmp_path: Path) -> None:
    Image.new("RGB", (4, 8), "red").save(tmp_path / "a.png")
    before = calibration_for(str(tmp_path), mean_colour).key
    Image.new("RGB", (40, 80), "blue").save(tmp_path / "a.png")
    assert calibration_for(str(tmp_path), mean_colour).key != before


@pytest.mark.parametrize(("crops", "warned"), [(1, True), (FEW_FOLDER_IMAGES - 1, True),
                                               (FEW_FOLDER_IMAGES, False)])  # fmt: skip
def test_a_folder_of_few_crops_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, crops: int, warned: bool
) -> None:
    for index in range(crops):
        Image.new("RGB", (4, 8), (index, 0, 0)).save(tmp_path / f"{index}.png")
    with caplog.at_level(logging.WARNING, logger="app.inference.calibration"):
        calibration = calibration_for(str(tmp_path), mean_colour)
    assert len(calibration.pixels()) == crops
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) == warned
    if warned:
        assert f"holds {crops} crop" in warnings[0]
        assert f"give at least {FEW_FOLDER_IMAGES}, better {SYNTHETIC_IMAGES}" in warnings[0]
