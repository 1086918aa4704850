"""The benchmark times a runtime as the service runs it: a batch on every stream."""

from __future__ import annotations

import threading
import time
from typing import Any

from app.bench import throughput


class OverlapCounter:
    """A forward pass of fixed length that records how many ran at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self.most_at_once = 0

    def __call__(self, batch: list[Any]) -> None:
        with self._lock:
            self._inside += 1
            self.most_at_once = max(self.most_at_once, self._inside)
        time.sleep(0.02)
        with self._lock:
            self._inside -= 1


def test_every_stream_keeps_a_batch_in_flight() -> None:
    """One batch at a time timed a two-stream runtime on one stream's share of the
    cores: app.bench read OpenVINO int8 at half its speed from batch 2 up."""
    one, two = OverlapCounter(), OverlapCounter()
    alone = throughput(one, [0] * 4, streams=1, seconds=0.3)
    together = throughput(two, [0] * 4, streams=2, seconds=0.3)
    assert (one.most_at_once, two.most_at_once) == (1, 2)
    assert 1.6 < together / alone < 2.4  # passes that take the same time, two at once
