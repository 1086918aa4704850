"""/embed returns what open_clip's own reference pipeline gives for the same file."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.codec import decode_embedding
from app.config import Settings
from app.tools.synthetic_people import make_person
from tests.conftest import serve
from tests.helpers import cosine, noise_jpeg, reference_embedding


async def check_parity(settings: Settings, model_dir: Path, crop: Path, dim: int) -> None:
    expected = reference_embedding(model_dir, crop)
    data = crop.read_bytes()  # noqa: ASYNC240 - a test's local file, before serving
    async with serve(settings) as (_, client):
        response = await client.post("/embed", files={"image": (crop.name, data)})
        assert response.status_code == 200, response.text
        body = response.json()
    served = decode_embedding(body["embedding"])
    assert body["dim"] == dim == served.shape[0]
    assert float(np.linalg.norm(served)) == pytest.approx(1.0, abs=1e-5)
    assert cosine(served, expected) >= 0.99999


async def test_parity_with_open_clip_on_the_tiny_model(
    tiny_model_dir: Path, tiny_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    crop = tmp_path / "crop.jpg"
    crop.write_bytes(noise_jpeg(11))
    await check_parity(tiny_settings(), tiny_model_dir, crop, dim=64)


async def test_parity_with_open_clip_on_vit_b_32_for_a_128x256_crop(
    vit_b_32_dir: Path, tmp_path: Path
) -> None:
    crop = tmp_path / "person.jpg"
    crop.write_bytes(noise_jpeg(12, size=(128, 256)))
    settings = Settings(model=f"local-dir:{vit_b_32_dir}", device="cpu", precision="fp32")
    await check_parity(settings, vit_b_32_dir, crop, dim=512)


@pytest.mark.parametrize("size", [(60, 150), (250, 575), (700, 1610)])
async def test_parity_on_vit_b_32_whichever_library_resizes(
    vit_b_32_dir: Path, tmp_path: Path, size: tuple[int, int]
) -> None:
    """Noise crops (the hardest case for a resize's rounding) that torch's resize
    enlarges, that Pillow's shrinks by less than 3x, and that torch's shrinks by more."""
    crop = tmp_path / "noise.jpg"
    pixels = np.random.default_rng(13).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(crop, "JPEG", quality=95)
    settings = Settings(model=f"local-dir:{vit_b_32_dir}", device="cpu", precision="fp32")
    await check_parity(settings, vit_b_32_dir, crop, dim=512)


async def test_a_large_noisy_crop_keeps_parity(vit_b_32_dir: Path, tmp_path: Path) -> None:
    """A 900 x 2000 person with sensor noise: decoded at half scale (twice the model's
    input), libjpeg's DCT scaling moved it to cosine 0.99997; decoded whole, it is
    open_clip's picture."""
    person = Image.open(io.BytesIO(make_person(np.random.default_rng(9)).jpeg)).convert("RGB")
    pixels = np.asarray(person.resize((900, 2000), Image.Resampling.BICUBIC)).astype(np.int16)
    noise = np.random.default_rng(10).integers(-60, 60, pixels.shape)
    crop = tmp_path / "noisy.jpg"
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(crop, quality=85)
    settings = Settings(model=f"local-dir:{vit_b_32_dir}", device="cpu", precision="fp32")
    await check_parity(settings, vit_b_32_dir, crop, dim=512)


async def test_a_large_jpeg_decoded_at_reduced_scale_keeps_parity(
    vit_b_32_dir: Path, tmp_path: Path
) -> None:
    """A 1800 x 3000 photo is decoded in JPEG draft mode (here at 1/2 scale, down to
    four times the model's input) and still embeds as open_clip's full decode does."""
    from skimage import data

    photo = Image.fromarray(data.chelsea()).resize((1800, 3000), Image.Resampling.LANCZOS)
    path = tmp_path / "photo.jpg"
    photo.save(path, "JPEG", quality=92)
    settings = Settings(model=f"local-dir:{vit_b_32_dir}", device="cpu", precision="fp32")
    await check_parity(settings, vit_b_32_dir, path, dim=512)
