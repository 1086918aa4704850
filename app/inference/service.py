"""The embedding pipeline: decode and preprocess in worker threads, batch, forward.

Decoding of one request overlaps the forward pass of earlier ones: the decode pool and
the batcher's forward thread are separate, and the event loop only moves futures.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from app.config import Settings
from app.errors import InvalidImage, ServiceError, at_item
from app.inference.batcher import DynamicBatcher
from app.inference.decode import decode_image
from app.reid.projection import Projection

logger = logging.getLogger(__name__)

FAILING_AFTER = 3  # consecutive failed forward passes before /ready says 503


class ImageEncoder(Protocol):
    """What the service needs of a model; ClipImageEncoder and test fakes provide it."""

    @property
    def info(self) -> Any: ...

    def preprocess(self, image: Image.Image) -> Any: ...

    def encode(self, batch: Sequence[Any]) -> npt.NDArray[np.float32]: ...

    def warm_up(self) -> None: ...

    @property
    def logit_scale(self) -> float: ...

    def embed_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...

    def release_text_tower(self) -> None: ...


def default_decode_workers() -> int:
    # Decoding a crop costs ~2 ms against ~60 ms of forward pass per image on CPU, so a
    # couple of threads keep the batcher fed without stealing the model's cores.
    return max(2, min(8, (os.cpu_count() or 2) // 2))


class EmbeddingService:
    def __init__(
        self,
        encoder: ImageEncoder,
        settings: Settings,
        observer: Callable[[int, list[float], float], None] | None = None,
        projection: Projection | None = None,
    ) -> None:
        self.encoder = encoder
        self.projection = projection
        self.settings = settings
        self._preparing = 0  # requests decoding now: they will join the queue shortly
        self._probe: Any = None  # a preprocessed blank crop for readiness checks
        workers = settings.decode_workers or default_decode_workers()
        self.decode_workers = workers
        self._decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        self.batcher: DynamicBatcher[Any, npt.NDArray[np.float32]] = DynamicBatcher(
            self._encode_rows,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_s,
            max_queue=settings.max_queue,
            name="embed",
            companions_expected=lambda: self._preparing > 0,
            observer=observer,
        )

    async def start(self) -> None:
        await self.batcher.start()

    async def model_works(self, fresh_s: float = 10.0, timeout_s: float = 5.0) -> bool:
        """Readiness that exercises the model: recent forward passes that worked count;
        without traffic a one-image probe goes through the batcher; a run of failed
        batches means no."""
        stats = self.batcher.stats
        if stats.consecutive_failures >= FAILING_AFTER:
            return False
        if stats.last_success_at and time.monotonic() - stats.last_success_at < fresh_s:
            return True
        if self._probe is None:
            blank = Image.new("RGB", (64, 128), (127, 127, 127))
            loop = asyncio.get_running_loop()
            self._probe = await loop.run_in_executor(
                self._decode_pool, self.encoder.preprocess, blank
            )
        try:
            await self.batcher.submit([self._probe], timeout_s=timeout_s)
        except ServiceError:
            return False
        return True

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        await self.batcher.stop(drain_timeout_s)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    async def embed(
        self, images: Sequence[bytes], locations: Sequence[str]
    ) -> npt.NDArray[np.float32]:
        """Embeddings of the given image files, one row each, L2-normalised, in order.

        `locations` name each image for error messages (`image`, `images[2]`).
        """
        return self.project(await self.forward(await self.prepare(images, locations)))

    def project(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The configured projection (CLIP_PROJECTION) of embedding rows, if any."""
        return rows if self.projection is None else self.projection.apply(rows)

    @property
    def output_dim(self) -> int:
        return int(self.projection.output_dim if self.projection else self.encoder.info.dim)

    async def forward(self, model_inputs: Sequence[Any]) -> npt.NDArray[np.float32]:
        """Prepared model inputs through the shared batcher; one row each, in order."""
        rows = await self.batcher.submit(model_inputs, timeout_s=self.settings.request_timeout_s)
        return np.stack(rows)

    async def prepare(
        self,
        images: Sequence[bytes],
        locations: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> list[Any]:
        """Decode each image and apply `transform` (default: the model's preprocessing)
        in the decode threads, in parallel; the first bad image fails the lot."""
        loop = asyncio.get_running_loop()
        work = partial(self._prepare_one, transform=transform or self.encoder.preprocess)
        self._preparing += 1
        try:
            jobs = [loop.run_in_executor(self._decode_pool, work, data) for data in images]
            outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            self._preparing -= 1
        failures = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
        if failures:
            index, error = failures[0]
            if not isinstance(error, ServiceError):
                raise error
            located = at_item(error, locations[index])
            if len(failures) > 1:
                others = ", ".join(locations[i] for i, _ in failures[1:])
                located.message += f" (also invalid: {others})"
            raise located
        return list(outcomes)

    def _prepare_one(self, data: bytes, transform: Callable[[Image.Image], Any]) -> Any:
        image = decode_image(data, max_pixels=self.settings.max_image_pixels)
        try:
            return transform(image)
        except ServiceError:
            raise
        except Exception:
            # A decoded image the transform cannot take is still the client's picture:
            # answer 400 rather than 500, and keep the traceback for us.
            logger.exception("preprocessing failed for a %dx%d image", *image.size)
            raise InvalidImage(
                f"image of {image.size[0]}x{image.size[1]} pixels could not be prepared for "
                "the model; send an ordinary person crop"
            ) from None

    def _encode_rows(self, batch: list[Any]) -> list[npt.NDArray[np.float32]]:
        return list(self.encoder.encode(batch))
