"""OpenVinoTower's choice between its streams and the pass over every core, with fake
compiled models: which request runs a call, and what may run beside it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.config import Precision
from app.inference.runtimes.openvino_tower import (
    SECOND_COPY_MAX_BYTES,
    OpenVinoTower,
    default_streams,
)
from tests.unit.test_memory import mapped_and_read, page_out_works, resident_kb


@dataclass
class Log:
    """Every pass, as (request name, images, started, ended)."""

    passes: list[tuple[str, int, float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def names(self) -> list[str]:
        return [name for name, *_ in sorted(self.passes, key=lambda p: p[2])]

    def overlapping(self, only_with: str = "") -> bool:
        """Whether two passes ran at once (one of them on a `only_with...` request)."""
        spans = sorted((start, end, name) for name, _, start, end in self.passes)
        return any(
            later[0] < earlier[1]
            and only_with in (earlier[2][: len(only_with)], later[2][: len(only_with)])
            for i, earlier in enumerate(spans)
            for later in spans[i + 1 :]
        )


class FakeRequest:
    def __init__(self, name: str, log: Log, seconds: float) -> None:
        self.name, self._log, self._seconds = name, log, seconds
        self._rows = np.zeros((0, 4), dtype=np.float32)

    def infer(self, inputs: dict[int, Any], share_inputs: bool = False) -> None:
        count = len(inputs[0])
        started = time.monotonic()
        time.sleep(self._seconds)
        self._rows = np.full((count, 4), float(count), dtype=np.float32)
        with self._log.lock:
            self._log.passes.append((self.name, count, started, time.monotonic()))

    def get_output_tensor(self, index: int) -> Any:
        return type("Tensor", (), {"data": self._rows})()


class FakeCompiled:
    def __init__(self, name: str, requests: int, log: Log, seconds: float = 0.05) -> None:
        self._name, self._requests, self._log, self._seconds = name, requests, log, seconds
        self._made = 0

    def get_property(self, key: str) -> int:
        assert key == "OPTIMAL_NUMBER_OF_INFER_REQUESTS"
        return self._requests

    def create_infer_request(self) -> FakeRequest:
        self._made += 1
        return FakeRequest(f"{self._name}{self._made}", self._log, self._seconds)


def pixels(count: int) -> torch.Tensor:
    return torch.zeros((count, 3, 4, 4))


def tower_and_log(streams: int = 2, solo: bool = True) -> tuple[OpenVinoTower, Log]:
    log = Log()
    whole = FakeCompiled("solo", 1, log) if solo else None
    return OpenVinoTower(FakeCompiled("stream", streams, log), whole), log


def run_together(tower: OpenVinoTower, sizes: list[int], stagger_s: float = 0.01) -> None:
    with ThreadPoolExecutor(len(sizes)) as pool:
        futures = []
        for size in sizes:
            futures.append(pool.submit(tower, pixels(size)))
            time.sleep(stagger_s)
        for future, size in zip(futures, sizes, strict=True):
            assert future.result().shape == (size, 4)


def test_a_lone_image_runs_over_every_core_and_a_batch_on_a_stream() -> None:
    tower, log = tower_and_log()
    assert tower.concurrency == 2
    assert tower.has_solo
    assert tower(pixels(1)).shape == (1, 4)
    assert tower(pixels(2)).shape == (2, 4)
    assert tower(pixels(7)).shape == (7, 4)
    assert [name[:4] for name in log.names()] == ["solo", "stre", "stre"]


def test_nothing_runs_beside_a_pass_over_every_core() -> None:
    tower, log = tower_and_log()
    run_together(tower, [1, 1, 3])  # the second and third arrive while the first runs
    assert log.names()[0] == "solo1"
    assert len(log.passes) == 3
    assert not log.overlapping(only_with="solo")


def test_a_lone_image_beside_a_running_stream_takes_the_other_stream() -> None:
    tower, log = tower_and_log()
    run_together(tower, [4, 1])
    names = log.names()
    assert all(name.startswith("stream") for name in names)
    assert len(set(names)) == 2  # both streams, at once
    assert log.overlapping()


def test_without_the_whole_core_model_every_call_takes_a_stream() -> None:
    tower, log = tower_and_log(solo=False)
    assert not tower.has_solo
    run_together(tower, [1, 1])
    assert all(name.startswith("stream") for name in log.names())
    assert log.overlapping()


def test_one_stream_needs_no_whole_core_model() -> None:
    tower, log = tower_and_log(streams=1)
    assert not tower.has_solo  # one stream already is a pass over every core
    run_together(tower, [1, 1])
    assert log.names() == ["stream1", "stream1"]
    assert not log.overlapping()


def test_a_failing_pass_over_every_core_does_not_block_the_next() -> None:
    tower, log = tower_and_log()

    def broken(inputs: dict[int, Any], share_inputs: bool = False) -> None:
        raise RuntimeError("device lost")

    solo = tower._streams.solo
    assert solo is not None
    working = solo.infer
    solo.infer = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="device lost"):
        tower(pixels(1))
    solo.infer = working  # type: ignore[method-assign]
    run_together(tower, [1, 2])  # neither waits for the pass that failed
    assert sorted(count for _, count, *_ in log.passes) == [1, 2]


@page_out_works
def test_settling_hands_back_the_mapped_weights_file(tmp_path: Path) -> None:
    weights = tmp_path / "tower.bin"
    size = 4 * 1024 * 1024
    mapping = mapped_and_read(weights, size)
    try:
        log = Log()
        tower = OpenVinoTower(FakeCompiled("stream", 2, log), FakeCompiled("solo", 1, log), weights)
        assert resident_kb(weights) >= size // 1024 * 0.9
        tower.settle()
        assert resident_kb(weights) <= size // 1024 * 0.1
        assert tower(pixels(1)).shape == (1, 4)  # and it still runs
    finally:
        mapping.close()


def weights_of(count: int) -> torch.nn.Module:
    """A module with `count` parameters that takes no memory (meta device)."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.empty(count, device="meta"))
    return module


@pytest.mark.parametrize(
    ("parameters", "precision", "expected"),
    [
        (88_000_000, Precision.BF16, 0),  # ViT-B-32: ~180 MB a copy, the second one pays
        (88_000_000, Precision.INT8, 0),
        (88_000_000, Precision.FP32, 1),  # ~350 MB a copy: one stream, one copy
        (304_000_000, Precision.BF16, 1),  # ViT-L-14: ~600 MB even in 16 bits
        (SECOND_COPY_MAX_BYTES // 2, Precision.BF16, 0),  # at the limit exactly
        (SECOND_COPY_MAX_BYTES // 2 + 1, Precision.BF16, 1),
    ],
)
def test_the_default_streams_buy_a_second_copy_only_when_it_is_small(
    parameters: int, precision: Precision, expected: int
) -> None:
    assert default_streams(weights_of(parameters), precision) == expected
