"""The images static int8 quantisation measures activation ranges on.

Static int8 fixes a scale per activation from what a few real inputs produce, so the
inputs should look like the traffic: by default synthetic person crops (people on varied
backgrounds and lighting, `app.tools.synthetic_people`), or the operator's own crops
from `CLIP_INT8_CALIBRATION_DIR`, which is what real cameras and real weights deserve.
Which set was used is part of the conversion cache key, so changing it re-calibrates.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from app.config import CALIBRATION_SUFFIXES, calibration_folder_fault
from app.inference.weights import WeightsUnavailable
from app.tools.synthetic_people import make_person

logger = logging.getLogger(__name__)

SYNTHETIC_IMAGES = 64
MAX_FOLDER_IMAGES = 128
# Fewer crops than this give a warning: each activation's scale is fixed by the largest
# values these few produce, and traffic that goes beyond them is clipped.
FEW_FOLDER_IMAGES = 16


@dataclass(frozen=True)
class Calibration:
    """`key` names the image set in the conversion cache; `pixels()` gives the
    preprocessed batch (N, 3, H, W), built only on a cache miss."""

    key: str
    pixels: Callable[[], torch.Tensor]


def calibration_for(folder: str, preprocess: Callable[[Image.Image], torch.Tensor]) -> Calibration:
    if not folder:
        return Calibration(f"synthetic{SYNTHETIC_IMAGES}", lambda: _synthetic(preprocess))
    paths = _folder_images(Path(folder))
    if len(paths) < FEW_FOLDER_IMAGES:
        logger.warning(
            "CLIP_INT8_CALIBRATION_DIR holds %d crop%s: int8's activation ranges measured "
            "on so few may clip what the cameras send; give at least %d, better %d or "
            "more, like the traffic (up to %d are used), or leave it empty for %d "
            "synthetic people",
            len(paths), "" if len(paths) == 1 else "s", FEW_FOLDER_IMAGES,
            SYNTHETIC_IMAGES, MAX_FOLDER_IMAGES, SYNTHETIC_IMAGES,
        )  # fmt: skip
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return Calibration(f"own{len(paths)}-{digest.hexdigest()[:12]}",
                       lambda: _from_files(paths, preprocess))  # fmt: skip


def _synthetic(preprocess: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    rng = np.random.default_rng(20_240_601)  # fixed: the same set on every machine
    people = (make_person(rng) for _ in range(SYNTHETIC_IMAGES))
    return torch.stack([preprocess(Image.open(io.BytesIO(p.jpeg)).convert("RGB")) for p in people])


def _folder_images(folder: Path) -> list[Path]:
    fault = calibration_folder_fault(str(folder))  # the folder may have changed since
    if fault is not None:
        raise WeightsUnavailable(fault)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in CALIBRATION_SUFFIXES)
    if len(paths) > MAX_FOLDER_IMAGES:  # spread over the folder, not its first files
        step = len(paths) / MAX_FOLDER_IMAGES
        paths = [paths[int(i * step)] for i in range(MAX_FOLDER_IMAGES)]
    return paths


def _from_files(
    paths: list[Path], preprocess: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor:
    pixels = []
    for path in paths:
        try:
            with Image.open(path) as image:
                pixels.append(preprocess(image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise WeightsUnavailable(
                f"CLIP_INT8_CALIBRATION_DIR: {path} is not a readable image ({exc})."
            ) from exc
    return torch.stack(pixels)
