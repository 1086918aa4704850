"""Embed many image files in process (batched, with progress) or through a running service."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from app.config import Settings
from app.inference.decode import decode_image
from app.inference.model import ClipImageEncoder

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def embed_in_process(
    paths: Sequence[Path], settings: Settings, batch_size: int = 32
) -> tuple[npt.NDArray[np.float32], str]:
    """Raw (unprojected) L2-normalised embeddings, and the model id they come from."""
    encoder = ClipImageEncoder.load(settings)
    encoder.release_text_tower()
    rows = []
    for start in tqdm(range(0, len(paths), batch_size), desc="embedding", unit="batch"):
        chunk = paths[start : start + batch_size]
        inputs = [
            encoder.preprocess(decode_image(p.read_bytes(), max_pixels=settings.max_image_pixels))
            for p in chunk
        ]
        rows.append(encoder.encode(inputs))
    dim = encoder.info.dim
    return (np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)), encoder.info.model


def embed_via_service(
    paths: Sequence[Path], url: str, api_key: str | None = None, batch_size: int = 32
) -> tuple[npt.NDArray[np.float32], str]:
    """Embeddings as the service returns them (its projection applied, if it has one)."""
    import httpx

    from app.client import ClipClient

    headers = {"X-API-Key": api_key} if api_key else {}
    model = str(httpx.get(f"{url.rstrip('/')}/info", headers=headers).json()["model"])
    with ClipClient(url, api_key=api_key) as client:
        rows = [
            client.embed_batch(list(paths[start : start + batch_size]))
            for start in tqdm(range(0, len(paths), batch_size), desc="embedding", unit="batch")
        ]
    return np.concatenate(rows), model
