"""Backend choice, the weights hash and the conversion cache, without a real model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.config import Backend, Precision
from app.inference.runtimes import BackendUnavailable, pick_backend, weights_digest
from app.inference.runtimes import torch_tower as torch_tower_module
from app.inference.runtimes.torch_tower import TorchTower, torch_tower

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("device", "precision", "expected"),
    [
        (CPU, Precision.FP32, Backend.OPENVINO),
        (CPU, Precision.BF16, Backend.OPENVINO),
        (CPU, Precision.INT8, Backend.OPENVINO),
        (CUDA, Precision.FP16, Backend.TORCH),
        (CUDA, Precision.FP32, Backend.TORCH),
    ],
)
def test_auto_picks_the_measured_fastest_runtime(
    monkeypatch: pytest.MonkeyPatch, device: torch.device, precision: Precision, expected: Backend
) -> None:
    monkeypatch.setattr("app.inference.runtimes.choice.cpu_has_int8_dot_product", lambda: True)
    assert pick_backend(Backend.AUTO, device, precision) == expected


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_without_vnni_auto_int8_runs_onnxruntime_and_nothing_else_moves(
    monkeypatch: pytest.MonkeyPatch, precision: Precision
) -> None:
    # OpenVINO's static int8 ran at half its own fp32 speed on an AVX2 EPYC.
    monkeypatch.setattr("app.inference.runtimes.choice.cpu_has_int8_dot_product", lambda: False)
    assert pick_backend(Backend.AUTO, CPU, Precision.INT8) == Backend.ONNXRUNTIME
    assert pick_backend(Backend.AUTO, CPU, precision) == Backend.OPENVINO
    assert pick_backend(Backend.OPENVINO, CPU, Precision.INT8) == Backend.OPENVINO


@pytest.mark.parametrize(
    ("backend", "device", "precision", "says"),
    [
        (Backend.OPENVINO, CPU, Precision.FP16, "bf16, fp32, int8"),
        (Backend.ONNXRUNTIME, CPU, Precision.BF16, "fp32, int8"),
        (Backend.OPENVINO, CUDA, Precision.FP16, "CPU only"),
    ],
)
def test_a_combination_that_cannot_run_fails_at_startup_naming_the_setting(
    backend: Backend, device: torch.device, precision: Precision, says: str
) -> None:
    with pytest.raises(BackendUnavailable, match="CLIP_BACKEND") as caught:
        pick_backend(backend, device, precision)
    assert says in str(caught.value)


def test_explicit_choices_that_run_are_kept() -> None:
    assert pick_backend(Backend.TORCH, CPU, Precision.INT8) == Backend.TORCH
    assert pick_backend(Backend.ONNXRUNTIME, CPU, Precision.FP32) == Backend.ONNXRUNTIME
    assert pick_backend(Backend.ONNXRUNTIME, CPU, Precision.INT8) == Backend.ONNXRUNTIME
    assert pick_backend(Backend.OPENVINO, CPU, Precision.INT8) == Backend.OPENVINO


def test_the_weights_hash_follows_the_weights_and_nothing_else() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    same = torch.nn.Linear(4, 3)
    same.load_state_dict(layer.state_dict())
    assert weights_digest(layer) == weights_digest(same)
    with torch.no_grad():
        same.bias[0] += 1e-6
    assert weights_digest(layer) != weights_digest(same)


class ThreadCountingTower(torch.nn.Module):
    """Records torch's thread count in each pass, and holds the pass a while, so
    passes started together overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []  # (images, threads)
        self.overlapped = 0
        self._inside = 0
        self._lock = threading.Lock()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._inside += 1
            self.overlapped = max(self.overlapped, self._inside)
            self.seen.append((len(pixels), torch.get_num_threads()))
        time.sleep(0.05)
        with self._lock:
            self._inside -= 1
        return pixels.flatten(1)[:, :4]


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("torch_threads")
def test_torch_streams_run_passes_at_once_on_their_share_of_the_threads() -> None:
    visual = ThreadCountingTower()
    tower = TorchTower(visual, torch.float32, streams=2, threads=4)
    batches = [torch.zeros(3, 3, 8, 8) for _ in range(6)]
    with ThreadPoolExecutor(tower.concurrency) as pool:
        features = list(pool.map(tower, batches))
    assert [tuple(f.shape) for f in features] == [(3, 4)] * 6
    assert visual.overlapped == 2
    assert {threads for images, threads in visual.seen} == {2}


@pytest.mark.usefixtures("torch_threads")
def test_a_lone_crop_runs_alone_over_every_thread() -> None:
    visual = ThreadCountingTower()
    tower = TorchTower(visual, torch.float32, streams=2, threads=4)
    tower(torch.zeros(1, 3, 8, 8))
    assert visual.seen == [(1, 4)]
    # One crop while a batch runs: on a stream's share, beside it.
    with ThreadPoolExecutor(2) as pool:
        batch = pool.submit(tower, torch.zeros(4, 3, 8, 8))
        time.sleep(0.01)
        pool.submit(tower, torch.zeros(1, 3, 8, 8)).result()
        batch.result()
    assert visual.seen[1:] == [(4, 2), (1, 2)]
    assert visual.overlapped == 2


def test_torch_on_the_cpu_takes_two_streams_by_default_and_one_on_request() -> None:
    visual = torch.nn.Linear(4, 4)
    cpu = torch.device("cpu")
    assert torch_tower(visual, Precision.FP32, cpu, streams=0, threads=2).concurrency == 2
    assert torch_tower(visual, Precision.FP32, cpu, streams=0, threads=1).concurrency == 1
    assert torch_tower(visual, Precision.FP32, cpu, streams=1, threads=2).concurrency == 1
    assert torch_tower(visual, Precision.FP32, cpu, streams=3, threads=6).concurrency == 3


@pytest.mark.usefixtures("torch_threads")
def test_a_one_stream_tower_keeps_its_threads_whatever_another_tower_set() -> None:
    """torch's thread count is the process's: a load tool probing two towers in one
    process measured one of them on the other's stream share."""
    streamed, alone = ThreadCountingTower(), ThreadCountingTower()
    two_streams = TorchTower(streamed, torch.float32, streams=2, threads=4)
    one_stream = TorchTower(alone, torch.float32, streams=1, threads=4)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(two_streams, [torch.zeros(4, 3, 8, 8)] * 2))
    one_stream(torch.zeros(4, 3, 8, 8))
    assert alone.seen == [(4, 4)]


@pytest.mark.usefixtures("torch_threads")
def test_a_tower_built_after_another_ran_takes_torchs_own_threads_not_a_streams_share() -> None:
    """Built with threads=0 on a thread a two-stream pass had left on one thread, a tower
    took one stream on one thread: a test's second app, a benchmark's next
    configuration. torch's own count is read before any pass sets it."""
    # What torch chose before any pass: earlier tests' passes may have left it lower.
    default = torch_tower_module._TORCH_DEFAULT_THREADS
    torch.set_num_threads(1)  # as a stream's pass on two threads leaves its thread
    cpu = torch.device("cpu")
    later = torch_tower(torch.nn.Linear(4, 4), Precision.FP32, cpu, streams=0)
    assert later.concurrency == (2 if default >= 2 else 1)
    counting = ThreadCountingTower()
    TorchTower(counting, torch.float32, streams=1)(torch.zeros(2, 3, 8, 8))
    assert counting.seen == [(2, default)]
