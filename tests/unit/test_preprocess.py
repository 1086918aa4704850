"""The split preprocessing computes what open_clip's own transform computes."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import (
    CenterCrop,
    Compose,
    InterpolationMode,
    Normalize,
    Resize,
    ToTensor,
)

from app.inference.geometry import PixelPreprocessor
from app.inference.preprocessing import (
    ImagePreprocessor,
    SplitPreprocess,
    VectorisedResizeCenterCrop,
    fast_resize_center_crop,
)
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
    fast = fast_resize_center_crop(list(reference.transforms))
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
        resized = fast(image)
        ours = np.asarray(resized if resized is not None else reference(image)).astype(np.int16)
        theirs = np.asarray(reference(image)).astype(np.int16)
        assert ours.shape == theirs.shape, (width, height)
        difference = np.abs(ours - theirs)
        assert difference.max() <= 1, (width, height)
        assert (difference > 0).mean() < 0.01 or index % 2, (width, height)
        exact += not difference.any()
    assert exact >= len(shapes) // 2  # most shapes are exact, to the pixel


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_the_pixels_served_stay_within_two_steps_of_pillow_at_every_scale(mode: str) -> None:
    """Noise, the hardest case for a resize's rounding, from 1/5x to 5x the side: within
    2/255 of open_clip's Pillow resize everywhere (bilinear 1/255). Shrinking bicubic by
    1-3x, where torch's kernel lands up to ~20/255 off on noise, Pillow's path runs."""
    interpolation = InterpolationMode(mode)
    reference = Compose([Resize(224, interpolation=interpolation), CenterCrop(224)])
    fast = fast_resize_center_crop(list(reference.transforms))
    assert fast is not None
    split = SplitPreprocess(reference, Normalize((0.5,) * 3, (0.5,) * 3), fast)
    rng = np.random.default_rng(11)
    widths = [40, 80, 128, 200, 224, 230, 250, 300, 448, 600, 700, 900, 1200]
    for width in widths:
        for height in (int(width * 2.3), int(width * 0.7)):
            noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            image = Image.fromarray(noise)
            ours = split.pixels(image).numpy().astype(np.int16)
            theirs = np.asarray(reference(image)).transpose(2, 0, 1).astype(np.int16)
            assert ours.shape == theirs.shape, (width, height)
            assert np.abs(ours - theirs).max() <= (2 if mode == "bicubic" else 1), (width, height)


def test_person_crops_take_the_vectorised_resize_and_mild_bicubic_shrinks_do_not() -> None:
    reference = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224)])
    fast = fast_resize_center_crop(list(reference.transforms))
    assert fast is not None
    vectorised = VectorisedResizeCenterCrop(fast)
    for enlarged_or_much_shrunk in [(128, 256), (64, 160), (224, 500), (900, 2000)]:
        image = Image.new("RGB", enlarged_or_much_shrunk, (90, 40, 200))
        pixels = vectorised(image)
        assert pixels is not None
        assert pixels.shape == (3, 224, 224)
        assert pixels.is_contiguous()
        assert pixels.dtype == torch.uint8
        assert (pixels[:, 100, 100] == torch.tensor([90, 40, 200], dtype=torch.uint8)).all()
    for shrunk_1_to_3x in [(250, 575), (448, 1000)]:
        assert vectorised(Image.new("RGB", shrunk_1_to_3x)) is None
    assert vectorised(Image.new("L", (128, 256))) is None  # Pillow's path converts it
    # Pillow resizes a huge image where it lies; torch would need a copy of it.
    assert vectorised(Image.new("RGB", (2100, 2000))) is None


def test_transforms_that_are_not_resize_then_crop_keep_their_own_path() -> None:
    assert fast_resize_center_crop([CenterCrop(224), Resize(224)]) is None
    assert fast_resize_center_crop([Resize((224, 224)), CenterCrop(224)]) is None
    assert fast_resize_center_crop([Resize(224, max_size=300), CenterCrop(224)]) is None


def test_decode_processes_get_a_torch_free_preprocessor_within_two_steps_of_the_threads(
    tiny_model_dir: Path,
) -> None:
    """Pillow's resize in the processes, torch's in the threads where it matches Pillow:
    the same picture, at most 2/255 apart in a few pixels."""
    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    size = transform.transforms[1].size
    full = ImagePreprocessor(transform, "shortest", tuple(size))
    lean = full.for_processes()
    assert isinstance(lean, PixelPreprocessor)
    lean = pickle.loads(pickle.dumps(lean))  # as a spawned process receives it
    rng = np.random.default_rng(5)
    # a person crop, a sliver (pre-cropped first), a tiny one (upscaled)
    for width, height in [(128, 256), (40, 900), (10, 20)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours = lean(image)
        assert ours.dtype == np.uint8
        threads = full(image).numpy()
        assert ours.shape == threads.shape
        difference = np.abs(ours.astype(np.int16) - threads)
        assert difference.max() <= 2, (width, height)
        assert (difference > 0).mean() < 0.05, (width, height)


def test_other_resize_modes_send_the_full_preprocessor(tiny_model_dir: Path) -> None:
    _, _, transform = open_clip.create_model_and_transforms(
        f"local-dir:{tiny_model_dir}", image_resize_mode="longest"
    )
    full = ImagePreprocessor(transform, "longest", (64, 64))
    assert full.for_processes() is full


def test_shapes_the_fast_path_does_not_cover_fall_back_to_the_full_transform() -> None:
    """A centre crop larger than the resized image pads (torchvision's rule): the
    process-side preprocessor loads the full transform for it."""
    transform = Compose(
        [Resize(32), CenterCrop(40), ToTensor(), Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))]
    )
    full = ImagePreprocessor(transform, "shortest", (40, 40))
    lean = pickle.loads(pickle.dumps(full.for_processes()))
    assert isinstance(lean, PixelPreprocessor)
    image = Image.fromarray(np.full((64, 48, 3), 200, dtype=np.uint8))
    ours = lean(image)
    assert ours.shape == (3, 40, 40)
    np.testing.assert_array_equal(ours, full(image).numpy())
    assert (ours[:, :, :4] == 0).all()  # the padding, left and right of a 32-wide resize
