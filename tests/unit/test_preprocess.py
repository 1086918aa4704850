"""The split preprocessing computes what open_clip's own transform computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from app.inference.model import SplitPreprocess


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(128, 256), (300, 90), (64, 64), (17, 5)])
def test_split_preprocess_matches_open_clip(
    tiny_model_dir: Path, mode: str, size: tuple[int, int]
) -> None:
    _, _, transform = open_clip.create_model_and_transforms(
        f"local-dir:{tiny_model_dir}", image_resize_mode=mode
    )
    split = SplitPreprocess.from_transform(transform)
    assert split is not None
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pixels = split.pixels(image)
    assert pixels.dtype == torch.uint8
    ours = split.normalize(pixels.unsqueeze(0))[0]
    reference = transform(image)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_unknown_transform_shapes_are_not_split() -> None:
    assert SplitPreprocess.from_transform(lambda image: image) is None
