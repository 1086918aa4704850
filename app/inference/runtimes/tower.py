"""What every runtime's tower is to the rest of the service, and the turns that let a
runtime with several forward streams give a lone request every core."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

import torch

from app.config import Backend
from app.inference.weights import WeightsUnavailable

R = TypeVar("R")


class BackendUnavailable(WeightsUnavailable):
    """The requested backend cannot run this device or precision; says what to change."""


# The largest second copy of the weights CLIP_FORWARD_STREAMS=0 buys for lone requests'
# latency (OpenVINO, ONNX Runtime): it has to fit beside everything else in the 1.5 GB
# the service keeps to under load.
SECOND_COPY_MAX_BYTES = 256 * 2**20


class Tower(Protocol):
    backend: Backend
    # Forward passes it runs at the same time, each on its own share of the cores; the
    # batcher keeps that many batches in flight.
    concurrency: int

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised float32 (N, 3, H, W) on the tower's device -> raw features."""
        ...

    def settle(self) -> None:
        """After the first passes on every path (the warm-up): let go of what only
        they needed."""
        ...


class Turns:
    """Which passes run at once: up to `streams` under load, each on its own share of the
    cores; and a pass that finds no other running with fewer images than there are
    streams (a lone client's crop) alone, over every core, with nothing starting beside
    it until it ends: one stream's throughput under load, every core's latency when idle."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self._changed = threading.Condition()
        self._running = 0
        self._solo_running = False

    @contextlib.contextmanager
    def turn(self, images: int) -> Iterator[bool]:
        """Wait for a turn; whether it is a solo one."""
        with self._changed:
            self._changed.wait_for(lambda: not self._solo_running)
            solo = self._running == 0 and images < self.streams
            self._solo_running = solo
            self._running += 1
        try:
            yield solo
        finally:
            with self._changed:
                self._running -= 1
                if solo:
                    self._solo_running = False
                self._changed.notify_all()


class Streams(Generic[R]):
    """A runtime's runners of passes at once (OpenVINO infer requests, ONNX Runtime
    sessions): a pass borrows a free one, so up to `concurrency` run together; with a
    `solo` runner (over every core) and more than one stream, a lone request runs on it
    instead (Turns). A runner may be listed more than once where it serves several
    callers at a time."""

    def __init__(self, runners: list[R], solo: R | None = None) -> None:
        self.concurrency = len(runners)
        self._idle: queue.SimpleQueue[R] = queue.SimpleQueue()
        for runner in runners:
            self._idle.put(runner)
        self.solo = solo if self.concurrency > 1 else None
        self._turns = Turns(self.concurrency)

    def run(
        self, pixels: torch.Tensor, infer: Callable[[R, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """`infer(runner, pixels)` on a free stream's runner, or alone on `solo`."""
        if self.solo is None:
            return self._on_a_stream(pixels, infer)
        with self._turns.turn(len(pixels)) as solo:
            return infer(self.solo, pixels) if solo else self._on_a_stream(pixels, infer)

    def _on_a_stream(
        self, pixels: torch.Tensor, infer: Callable[[R, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        runner = self._idle.get()
        try:
            return infer(runner, pixels)
        finally:
            self._idle.put(runner)


def example_pixels(image_size: tuple[int, int]) -> torch.Tensor:
    """A batch of one blank image: what a converter traces the tower with."""
    return torch.zeros((1, 3, *image_size), dtype=torch.float32)
