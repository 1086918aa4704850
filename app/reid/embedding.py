"""Embed many image files in process (batched, with progress) or through a running service."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import open_clip
import torch
from tqdm import tqdm

from app.config import Settings
from app.inference.decode import decode_image
from app.inference.model import ClipImageEncoder
from app.inference.runtimes import weights_digest
from app.inference.weights import WeightsUnavailable, resolve_model_source

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model embeddings come from: the readable id (/info's `model`, for messages)
    and, where known, the hash of its image tower's weights (what projection files are
    checked against: two `local-dir:` folders of one name share the readable id)."""

    name: str
    weights_sha256: str = ""
    dim: int = 0


def identify_model(settings: Settings) -> ModelIdentity:
    """The model `settings` name, identified by its weights before any image is embedded.

    Builds the fp32 tower on the CPU once more: the encoder casts (or converts) its own
    copy for the precision and backend asked, and the hash must not depend on either.
    The hash is the one the conversion cache is keyed by (runtimes.weights_digest)."""
    source = resolve_model_source(settings.model, settings.pretrained)
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            source.model_name, pretrained=source.checkpoint, device="cpu",
            **source.open_clip_kwargs,
        )  # fmt: skip
    except Exception as exc:
        raise WeightsUnavailable(f"open_clip could not build {source.display_name}: {exc}") from exc
    visual: torch.nn.Module = model.visual
    dim = getattr(visual, "output_dim", 0)
    return ModelIdentity(source.display_name, weights_digest(visual), int(dim or 0))


def load_encoder(settings: Settings) -> ClipImageEncoder:
    encoder = ClipImageEncoder.load(settings)
    encoder.release_text_tower()
    return encoder


def embed_in_process(
    paths: Sequence[Path],
    settings: Settings,
    batch_size: int = 32,
    encoder: ClipImageEncoder | None = None,
) -> tuple[npt.NDArray[np.float32], str]:
    """Raw (unprojected) L2-normalised embeddings, and the model id they come from; with
    the encoder loaded from `settings` unless one is given."""
    encoder = encoder or load_encoder(settings)
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
