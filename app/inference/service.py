"""The embedding pipeline: admit, read headers, decode and preprocess in worker threads,
batch, forward.

Decoding of one request overlaps the forward pass of earlier ones: the decode pool and
the batcher's forward thread are separate, and the event loop only moves futures.
Every request is admitted (images, then pixels) before its images are decoded, and all
its work runs under one deadline.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image

from app.config import Settings
from app.errors import (
    RequestTimedOut,
    ServiceError,
    ShuttingDown,
    at_item,
)
from app.inference.admission import Admission, AdmissionLimits, Ticket
from app.inference.batcher import DynamicBatcher
from app.inference.decode import decoded_pixels, load_rgb, open_image, prepare_image
from app.inference.decode_workers import (
    DecodeProcesses,
    default_decode_processes,
    split,
)
from app.inference.encoder import ImageEncoder, ModelInput
from app.inference.frames import Box, FloatBox, box_pixels, fit_boxes, oriented_size
from app.inference.projection import Projection
from app.inference.readiness import ReadinessMonitor

logger = logging.getLogger(__name__)

T = TypeVar("T")

# JPEGs are decoded at reduced scale down to four times the model's input side: enough
# that the model's own antialiased resize sees the same picture, and a 12 Mpx photo
# decodes at a quarter of the cost. At twice it, libjpeg's DCT scaling (a filter of its
# own) left a noisy 900 x 2000 crop at cosine 0.99997 to open_clip's full decode, under
# the 0.99999 parity bar; at four times, 0.99999+ where the rest of the resize is 4x.
_DRAFT_FACTOR = 4


def default_decode_workers() -> int:
    # Decoding a crop costs ~2 ms against ~60 ms of forward pass per image on CPU, so a
    # couple of threads keep the batcher fed without stealing the model's cores.
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def run_in(executor: Executor, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """`function(*args)` in `executor`, with the caller's context variables (the request
    id in log lines); cancelling the future drops the job if it has not started."""
    context = contextvars.copy_context()
    return asyncio.get_running_loop().run_in_executor(executor, context.run, function, *args)


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
        self._closing = False
        workers = settings.decode_workers or default_decode_workers()
        self.decode_workers = workers
        self._decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        self._draft_side = _DRAFT_FACTOR * max(encoder.info.image_size)
        self.admission = Admission(
            AdmissionLimits(
                max_images=settings.max_queue,
                max_pixels=settings.max_pixels_in_flight,
                max_request_pixels=settings.max_request_pixels,
            )
        )
        self.batcher: DynamicBatcher[ModelInput, npt.NDArray[np.float32]] = DynamicBatcher(
            self._encode_rows,
            max_batch_size=settings.max_batch_size,
            # Admission bounds what reaches the queue; this bound only guards callers
            # that bypass it (the readiness probe), so it can never refuse a request.
            max_queue=settings.max_queue + 1,
            max_wait_s=settings.max_wait_s,
            name="embed",
            companions_expected=lambda: self._preparing > 0,
            observer=observer,
            concurrency=encoder.info.streams,
        )
        self.readiness = ReadinessMonitor(self.batcher, self._probe_input)
        processes = settings.decode_processes
        if processes < 0:
            processes = default_decode_processes(encoder.info.device)
        self.decode_processes = processes
        self._processes = (
            DecodeProcesses(
                processes, encoder.preprocessor, settings.max_image_pixels, self._draft_side
            )
            if processes
            else None
        )

    async def start(self) -> None:
        if self._processes is not None:
            try:
                pids = await self._processes.start()
                logger.info("%d decode processes started: %s", len(pids), pids)
            except Exception as exc:  # e.g. no /dev/shm for its semaphores in a sandbox
                logger.warning("decode processes could not start (%r); threads decode", exc)
                self._processes.shutdown()
                self._processes, self.decode_processes = None, 0
        await self.batcher.start()

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        self._closing = True
        self.readiness.stop()
        await self.batcher.stop(drain_timeout_s)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown()

    async def model_works(self) -> bool:
        return await self.readiness.model_works()

    @property
    def output_dim(self) -> int:
        return int(self.projection.output_dim if self.projection else self.encoder.info.dim)

    async def embed(
        self, images: Sequence[bytes], locations: Sequence[str]
    ) -> npt.NDArray[np.float32]:
        """Embeddings of the given image files, one row each, L2-normalised, in order.

        `locations` name each image for error messages (`image`, `images[2]`).
        """
        async with self.admitted(len(images)) as ticket:
            if self._processes is not None:  # bytes travel to them, not opened images
                self.charge(images, locations, ticket)
                inputs = await self._prepare_files(images, locations)
            else:
                inputs = await self.prepare(self.open(images, locations, ticket), locations)
            rows = await self.forward(inputs)
        return self.project(rows)

    async def _prepare_files(
        self, images: Sequence[bytes], locations: Sequence[str]
    ) -> list[ModelInput]:
        """The model's inputs for image files, prepared in the decode processes."""
        assert self._processes is not None
        self._preparing += 1
        try:
            outcomes = await self._processes.prepare(images)
        finally:
            self._preparing -= 1
        failures = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, ServiceError)]
        if failures:
            raise _located(failures, locations)
        return outcomes  # type: ignore[return-value]

    @asynccontextmanager
    async def admitted(self, images: int) -> AsyncIterator[Ticket]:
        """Permits for `images` model inputs (Overloaded when they do not fit), held
        until the block ends, which must be within CLIP_REQUEST_TIMEOUT_S."""
        if self._closing or not self.batcher.running:
            raise ShuttingDown("the service is shutting down; retry on another replica")
        ticket = self.admission.admit(images)
        timeout_s = self.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                yield ticket
        except TimeoutError:
            raise RequestTimedOut(
                f"the request took over {timeout_s:g}s (CLIP_REQUEST_TIMEOUT_S); the service "
                "is overloaded or the timeout too short"
            ) from None
        finally:
            ticket.release()

    def open(
        self, images: Sequence[bytes], locations: Sequence[str], ticket: Ticket
    ) -> list[Image.Image]:
        """Read every image's header and charge its decoded pixels to the ticket, before
        any pixel is decoded. Headers are a few hundred bytes: cheap enough for the
        event loop, and a refusal never waits behind other requests' decoding."""
        opened: list[Image.Image] = []
        failures: list[tuple[int, ServiceError]] = []
        for index, data in enumerate(images):
            try:
                opened.append(
                    open_image(
                        data, max_pixels=self.settings.max_image_pixels, reduce_to=self._draft_side
                    )
                )
            except ServiceError as error:
                failures.append((index, error))
        if failures:
            raise _located(failures, locations)
        ticket.add_pixels(sum(image.size[0] * image.size[1] for image in opened))
        return opened

    def charge(self, images: Sequence[bytes], locations: Sequence[str], ticket: Ticket) -> None:
        """open()'s admission for images decoded elsewhere (the decode processes): every
        image's decoded pixels charged to the ticket before any is decoded, from headers
        read without Pillow where possible."""
        total = 0
        failures: list[tuple[int, ServiceError]] = []
        for index, data in enumerate(images):
            try:
                total += decoded_pixels(
                    data, max_pixels=self.settings.max_image_pixels, reduce_to=self._draft_side
                )
            except ServiceError as error:
                failures.append((index, error))
        if failures:
            raise _located(failures, locations)
        ticket.add_pixels(total)

    def project(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The configured projection (CLIP_PROJECTION) of embedding rows, if any."""
        return rows if self.projection is None else self.projection.apply(rows)

    async def forward(self, model_inputs: Sequence[ModelInput]) -> npt.NDArray[np.float32]:
        """Prepared model inputs through the shared batcher; one row each, in order.
        (The deadline is the caller's: `admitted` holds it for the whole request.)"""
        try:
            rows = await self.batcher.submit(model_inputs)
        except ServiceError:
            self.readiness.check()
            raise
        return np.stack(rows)

    async def prepare(
        self,
        images: Sequence[Image.Image],
        locations: Sequence[str],
        transform: Callable[[Image.Image], T] | None = None,
    ) -> list[T]:
        """Decode each opened image and apply `transform` (default: the model's
        preprocessing) in the decode threads, in parallel; the first bad image fails
        the lot, and the jobs not yet started are dropped."""
        chosen: Callable[[Image.Image], Any] = transform or self.encoder.preprocess

        def work(share: list[Image.Image]) -> list[Any]:
            return self._prepare_share(share, chosen)

        return await self._in_decode_threads(list(images), work, locations)

    async def embed_frame(
        self, frame: bytes, boxes: Sequence[FloatBox]
    ) -> tuple[list[Box], npt.NDArray[np.float32]]:
        """Embeddings of the boxes' crops of one frame, in box order, and the boxes as
        used (whole pixels, clipped to the frame)."""
        async with self.admitted(len(boxes)) as ticket:
            used, inputs = await self.prepare_frame(frame, boxes, ticket, self.encoder.preprocess)
            if not inputs:
                return used, np.zeros((0, self.output_dim), np.float32)
            rows = await self.forward(inputs)
        return used, self.project(rows)

    async def prepare_frame(
        self,
        frame: bytes,
        boxes: Sequence[FloatBox],
        ticket: Ticket,
        transform: Callable[[Image.Image], T],
    ) -> tuple[list[Box], list[T]]:
        """`transform` of each box's crop of the frame, in box order. The frame's header
        is read, the boxes fitted to it and its pixels charged before any decoding; then
        the frame is decoded once, in a decode thread, and the crops are cut and
        transformed in all of them.

        Always at full scale (no JPEG draft mode): person boxes in camera frames are
        mostly smaller than twice the model's input, where a reduced decode would lose
        the detail a crop sent on its own keeps, and parity with /embed would go. And in
        threads even where decode processes run: a frame is one decode, and its crops
        are views of it that processes would need copied to them."""
        try:
            opened = open_image(frame, max_pixels=self.settings.max_image_pixels)
        except ServiceError as error:
            raise at_item(error, "image") from None
        width, height = oriented_size(opened)
        used = fit_boxes(boxes, width, height)
        ticket.add_pixels(width * height + box_pixels(used))
        self._preparing += 1
        try:
            # With no boxes too: a frame cut short or corrupt is refused whatever it
            # holds, not answered "nobody here" because only its header was read.
            decoded = await run_in(self._decode_pool, _decode_frame, opened)
        finally:
            self._preparing -= 1
        if isinstance(decoded, ServiceError):
            raise at_item(decoded, "image")
        if not used:
            return used, []
        if decoded.size != (width, height):  # an EXIF block Pillow read otherwise on load
            used = fit_boxes(boxes, *decoded.size)
        frame_rgb = decoded

        def work(share: list[Box]) -> list[T | ServiceError]:
            return _cut_share(share, frame_rgb, transform)

        locations = [f"boxes[{i}]" for i in range(len(used))]
        return used, await self._in_decode_threads(used, work, locations)

    async def _in_decode_threads(
        self,
        items: list[Any],
        work: Callable[[list[Any]], list[T | ServiceError]],
        locations: Sequence[str],
    ) -> list[T]:
        """`work` over contiguous shares of `items`, one job per decode thread; the first
        item that failed fails the lot, named by its location.

        One job per decode thread, not one per item: every job costs the event loop a
        future and two callbacks under the GIL, which profiling put at a third of the
        loop's time on 32-image requests."""
        if not items:
            return []
        shares = split(items, self.decode_workers)
        self._preparing += 1
        jobs = [run_in(self._decode_pool, work, share) for share in shares]
        try:
            done = await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            self._preparing -= 1
            for job in jobs:
                job.cancel()
        for share in done:
            if isinstance(share, BaseException):
                raise share  # not an item's fault (ServiceErrors are caught per item)
        outcomes = [outcome for share in done for outcome in share]  # type: ignore[union-attr]
        failures = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, ServiceError)]
        if failures:
            raise _located(failures, locations)
        return outcomes  # type: ignore[return-value]

    def _prepare_share(
        self, images: list[Image.Image], transform: Callable[[Image.Image], T]
    ) -> list[T | ServiceError]:
        outcomes: list[T | ServiceError] = []
        for image in images:
            try:
                outcomes.append(prepare_image(image, transform))
            except ServiceError as error:
                outcomes.append(error)
        return outcomes

    async def _probe_input(self) -> ModelInput:
        blank = Image.new("RGB", (64, 128), (127, 127, 127))
        return await run_in(self._decode_pool, self.encoder.preprocess, blank)

    def _encode_rows(self, batch: list[ModelInput]) -> list[npt.NDArray[np.float32]]:
        return list(self.encoder.encode(batch))


def _decode_frame(opened: Image.Image) -> Image.Image | ServiceError:
    try:
        return load_rgb(opened)
    except ServiceError as error:
        return error


def _cut_share(
    boxes: list[Box], frame: Image.Image, transform: Callable[[Image.Image], T]
) -> list[T | ServiceError]:
    """Decode thread: each box's crop of the decoded frame, through `transform`."""
    outcomes: list[T | ServiceError] = []
    for box in boxes:
        try:
            outcomes.append(prepare_image(frame.crop(box), transform))
        except ServiceError as error:
            outcomes.append(error)
    return outcomes


def _located(failures: list[tuple[int, ServiceError]], locations: Sequence[str]) -> ServiceError:
    """The first failure, named by its item, listing the other items that failed too."""
    index, error = failures[0]
    located = at_item(error, locations[index])
    if len(failures) > 1:
        others = ", ".join(locations[i] for i, _ in failures[1:])
        located.message += f" (also invalid: {others})"
        located.args = (located.message,)
    return located
