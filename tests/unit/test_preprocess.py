"""The split preprocessing computes what open_clip's own transform computes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

from app.inference.preprocessing import ResizeCenterCrop, SplitPreprocess
from app.tools.synthetic_people import make_person


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
    # one 1/255 step in a rare pixel (ResizeCenterCrop), scaled by Normalize's std
    step = 1 / 255 / min(transform.transforms[-1].std)
    torch.testing.assert_close(ours, reference, rtol=0, atol=step + 1e-6)
    assert (ours - reference).abs().gt(1e-6).float().mean() < 0.01


def test_unknown_transform_shapes_are_not_split() -> None:
    assert SplitPreprocess.from_transform(lambda image: image) is None


def test_the_default_transform_takes_the_one_resize_path(tiny_model_dir: Path) -> None:
    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    split = SplitPreprocess.from_transform(transform)
    assert split is not None
    assert split.fast is not None


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resizing_only_the_kept_region_matches_resize_then_centre_crop(mode: str) -> None:
    """Over shapes that round every way (person crops, wide boxes, odd sizes, images
    already at the target side, ones that need padding), on smooth pictures and on
    noise: at most 1/255 apart, in under 1% of pixels (Pillow may order its two passes
    differently for the strip than for the whole image)."""
    interpolation = InterpolationMode(mode)
    reference = Compose([Resize(224, interpolation=interpolation), CenterCrop(224)])
    fast = ResizeCenterCrop.matching(list(reference.transforms))
    assert fast is not None
    rng = np.random.default_rng(7)
    shapes = [(128, 256), (96, 288), (300, 90), (224, 224), (224, 500), (225, 449), (47, 131)]
    shapes += [(int(w), int(h)) for w, h in rng.integers(20, 900, size=(40, 2))]
    exact = 0
    for index, (width, height) in enumerate(shapes):
        if index % 2:
            noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            image = Image.fromarray(noise)
        else:
            person = Image.open(io.BytesIO(make_person(rng).jpeg)).convert("RGB")
            image = person.resize((width, height), Image.Resampling.BILINEAR)
        ours = np.asarray(fast(image, reference)).astype(np.int16)
        theirs = np.asarray(reference(image)).astype(np.int16)
        assert ours.shape == theirs.shape, (width, height)
        difference = np.abs(ours - theirs)
        assert difference.max() <= 1, (width, height)
        assert (difference > 0).mean() < 0.01 or index % 2, (width, height)
        exact += not difference.any()
    assert exact >= len(shapes) // 2  # most shapes are exact, to the pixel


def test_transforms_that_are_not_resize_then_crop_keep_their_own_path() -> None:
    assert ResizeCenterCrop.matching([CenterCrop(224), Resize(224)]) is None
    assert ResizeCenterCrop.matching([Resize((224, 224)), CenterCrop(224)]) is None
    assert ResizeCenterCrop.matching([Resize(224, max_size=300), CenterCrop(224)]) is None
