"""Where images are decoded and preprocessed: threads, and optionally processes.

Decoding and resizing release the GIL, but what surrounds them (PIL's Python layers,
numpy and torch wrappers) does not: measured on a 16-core GPU host, eight decode threads
fed the model about 850 crops/s, a seventh of its fp16 ceiling. Processes have a GIL
each. They take the /embed path's model preprocessing (ImagePreprocessor.for_processes:
Pillow and numpy alone for CLIP's resize and crop, so a process costs ~50 MB); other
transforms (/analyze's regions) stay on the threads.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy.typing as npt
import torch
from PIL import Image

from app.errors import Overloaded, ServiceError
from app.inference.decode_process import prepare_files, start_worker, worker_pid

logger = logging.getLogger(__name__)

T = TypeVar("T")


def split(items: list[T], parts: int) -> list[list[T]]:
    """`items` in at most `parts` contiguous shares of near-equal length, in order."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    shares, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        shares.append(items[start:end])
        start = end
    return shares


def default_decode_processes(device: str) -> int:
    """Half the cores (at most 16) on a many-core host whose model is on a GPU; none on
    CPU, where the model needs every core and threads keep up with it."""
    cores = os.cpu_count() or 1
    if not device.startswith("cuda") or cores < 8:
        return 0
    return min(16, cores // 2)


class DecodeProcesses:
    """A pool of processes preparing image files for the model, in shares.

    A worker that dies (the kernel's OOM killer, a crash in a decoder) breaks the whole
    pool: the requests it held get 503 and the next request finds a fresh pool."""

    def __init__(
        self,
        processes: int,
        preprocessor: Callable[[Image.Image], torch.Tensor],
        max_pixels: int,
        reduce_to: int,
    ) -> None:
        self.processes = processes
        # The torch-free form where there is one: a process then costs ~50 MB, not ~700.
        lean = getattr(preprocessor, "for_processes", None)
        self._preprocessor = lean() if lean is not None else preprocessor
        self._max_pixels = max_pixels
        self._reduce_to = reduce_to
        # spawn, not fork: the parent holds threads (and maybe a CUDA context), which a
        # forked child would inherit in an undefined state.
        self._context = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.processes,
            mp_context=self._context,
            initializer=start_worker,
            initargs=(self._preprocessor,),
        )

    async def start(self) -> list[int]:
        """Start every worker now, not on the first requests; their pids."""
        jobs = [self._pool.submit(worker_pid) for _ in range(self.processes)]
        return list(await asyncio.gather(*(asyncio.wrap_future(job) for job in jobs)))

    async def prepare(self, files: Sequence[bytes]) -> list[torch.Tensor | ServiceError]:
        """Model inputs for `files`, in order; an image's failure is its entry."""
        pool = self._pool
        jobs: list[Future[list[npt.NDArray[Any] | ServiceError]]] = []
        try:
            for share in split(list(files), self.processes):
                jobs.append(pool.submit(prepare_files, share, self._max_pixels, self._reduce_to))
            done = await asyncio.gather(*(asyncio.wrap_future(job) for job in jobs))
        except BrokenProcessPool:
            self._replace(pool)
            raise Overloaded(
                "an image-decoding process died while preparing this request; retry"
            ) from None
        finally:
            for job in jobs:
                job.cancel()
        return [
            outcome if isinstance(outcome, ServiceError) else torch.from_numpy(outcome)
            for share in done
            for outcome in share
        ]

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if self._pool is broken:
            logger.error("a decode process died; starting a new pool of %d", self.processes)
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
