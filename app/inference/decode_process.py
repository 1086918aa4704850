"""What runs inside a decode process (decode_workers.DecodeProcesses): torch-free, so a
process costs tens of megabytes and starts in a fraction of a second, not a torch import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import numpy.typing as npt
from PIL import Image

from app.errors import ServiceError
from app.inference.decode import open_image, prepare_image

_preprocessor: Callable[[Image.Image], Any] | None = None


def start_worker(preprocessor: Callable[[Image.Image], Any]) -> None:
    global _preprocessor
    _preprocessor = preprocessor
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the processes are the parallelism
    if "torch" in sys.modules:  # a preprocessor without a torch-free path brought it
        sys.modules["torch"].set_num_threads(1)


def worker_pid() -> int:
    return os.getpid()


def prepare_files(
    files: list[bytes], max_pixels: int, reduce_to: int
) -> list[npt.NDArray[Any] | ServiceError]:
    """uint8 (C, H, W) model inputs (or float tensors' arrays) for image files, in order;
    an image's failure is its entry."""
    assert _preprocessor is not None, "worker started without a preprocessor"
    outcomes: list[npt.NDArray[Any] | ServiceError] = []
    for data in files:
        try:
            image = open_image(data, max_pixels=max_pixels, reduce_to=reduce_to)
            prepared = prepare_image(image, _preprocessor)
            outcomes.append(prepared.numpy() if hasattr(prepared, "numpy") else prepared)
        except ServiceError as error:
            outcomes.append(error)
    return outcomes
