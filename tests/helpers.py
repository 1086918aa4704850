"""Image and embedding makers shared by the tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def image_bytes(
    size: tuple[int, int] = (128, 256),
    color: tuple[int, ...] | int = (180, 40, 40),
    fmt: str = "JPEG",
    mode: str = "RGB",
    **save_kwargs: Any,
) -> bytes:
    """An encoded image of one colour; a gradient is added so models see structure."""
    image = Image.new(mode, size, color)
    if mode == "RGB":
        ramp = np.linspace(0, 60, size[0], dtype=np.float32)[None, :, None]
        pixels = np.clip(np.asarray(image, dtype=np.float32) + ramp, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def noise_jpeg(seed: int, size: tuple[int, int] = (128, 256)) -> bytes:
    """A distinct random picture per seed, so embeddings differ between images."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(8, 4, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def reference_embedding(model_dir: Path, image_path: Path) -> np.ndarray:
    """The open_clip README's recipe, step by step: what /embed must agree with."""
    import open_clip  # here, not above: most tests never need open_clip loaded
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model.eval()
    image = preprocess(Image.open(image_path)).unsqueeze(0)
    with torch.no_grad():
        features = model.encode_image(image)
        features /= features.norm(dim=-1, keepdim=True)
    return features[0].numpy()


def http_scope(
    path: str, headers: list[tuple[bytes, bytes]], method: str = "POST"
) -> dict[str, Any]:
    """An ASGI HTTP scope, for tests that drive the app with their own receive and send
    (a client that stalls, trickles or hangs up)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
