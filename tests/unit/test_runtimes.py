"""Backend choice, the weights hash and the conversion cache, without a real model."""

from __future__ import annotations

import pytest
import torch

from app.config import Backend, Precision
from app.inference.runtimes import BackendUnavailable, pick_backend, weights_digest

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
    device: torch.device, precision: Precision, expected: Backend
) -> None:
    assert pick_backend(Backend.AUTO, device, precision) == expected


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
