"""The model seam: what the rest of the service may know about an image encoder.

`ClipImageEncoder` (model.py) is the real one; tests wrap it or fake it. Everything
above this seam sees PIL images in, `ModelInput`s through the batcher, float32 rows out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

# One preprocessed image, on the CPU: (C, H, W) uint8 pixels that the forward pass
# normalises, or open_clip's float tensor for transforms of an unknown shape.
ModelInput: TypeAlias = torch.Tensor


@dataclass(frozen=True)
class EncoderInfo:
    model: str
    dim: int
    device: str
    precision: str
    backend: str
    image_size: tuple[int, int]
    resize_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Forward passes the runtime takes at once (OpenVINO CPU streams); encode() may be
    # called from that many threads together.
    streams: int = 1
    # SHA-256 of the fp32 image tower's weights (runtimes.weights_digest): what tells two
    # models apart whose readable ids are the same (local-dir: names only the folder).
    weights_sha256: str = ""


class ImageEncoder(Protocol):
    """load -> preprocess (decode threads) -> encode = forward + postprocess (forward
    thread). Text embeddings are for zero-shot labels at startup only."""

    @property
    def info(self) -> EncoderInfo: ...

    def preprocess(self, image: Image.Image) -> ModelInput: ...

    @property
    def preprocessor(self) -> Callable[[Image.Image], ModelInput]:
        """What preprocess() does, as a picklable object: decode processes run it."""
        ...

    def encode(self, batch: Sequence[ModelInput]) -> npt.NDArray[np.float32]: ...

    def warm_up(self) -> None: ...

    @property
    def logit_scale(self) -> float: ...

    def embed_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...

    def release_text_tower(self) -> None: ...
