"""Embed many image files in process (batched, with progress) or through a running service."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from PIL import Image
from tqdm import tqdm

from app.config import Settings
from app.errors import InvalidImage, PayloadTooLarge
from app.inference.decode import decode_image

if TYPE_CHECKING:  # torch and open_clip: imported when a model is loaded, not before
    from app.inference.model import ClipImageEncoder

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


def identify(encoder: ClipImageEncoder) -> ModelIdentity:
    """The loaded model's identity: its readable id and the hash of its fp32 image tower,
    which the encoder takes once at load (the same one the conversion cache is keyed by)."""
    info = encoder.info
    return ModelIdentity(info.model, info.weights_sha256, info.dim)


def load_encoder(settings: Settings) -> ClipImageEncoder:
    from app.inference.model import ClipImageEncoder

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
        inputs = [encoder.preprocess(_decoded(p, settings.max_image_pixels)) for p in chunk]
        rows.append(encoder.encode(inputs))
    dim = encoder.info.dim
    return (np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)), encoder.info.model


class UnreadableCrop(ValueError):
    """A file among the crops that is no image, or one too large: named, so it can be
    fixed or removed, instead of a traceback after the model has loaded."""


def _decoded(path: Path, max_pixels: int) -> Image.Image:
    try:
        return decode_image(path.read_bytes(), max_pixels=max_pixels)
    except (InvalidImage, PayloadTooLarge) as exc:
        raise UnreadableCrop(f"{path}: {exc.message}; fix or remove it") from None
    except OSError as exc:
        raise UnreadableCrop(f"{path}: cannot be read ({exc.strerror or exc})") from None


def embed_via_service(
    paths: Sequence[Path], url: str, api_key: str | None = None, batch_size: int = 32
) -> npt.NDArray[np.float32]:
    """Embeddings as the service returns them (its projection applied, if it has one).
    Which model that is, the caller reads from /info, where it can say what failed."""
    from app.client import ClipClient, ClipServiceError

    rows = []
    with ClipClient(url, api_key=api_key) as client:
        for start in tqdm(range(0, len(paths), batch_size), desc="embedding", unit="batch"):
            chunk = list(paths[start : start + batch_size])
            try:
                rows.append(client.embed_batch(chunk))
            except ClipServiceError as exc:
                # The service names the image by its place in the batch: name the file.
                place = re.match(r"images\[(\d+)\]: ", exc.message)
                if exc.status in (400, 413, 422) and place and int(place[1]) < len(chunk):
                    reason = exc.message[place.end() :]
                    raise UnreadableCrop(f"{chunk[int(place[1])]}: {reason}") from None
                raise
    return np.concatenate(rows)
