"""What `auto` picks, and what a named backend refuses on this device."""

from __future__ import annotations

import torch

from app.config import Backend, Precision, precision_refusal
from app.inference.cpu_features import cpu_has_int8_dot_product
from app.inference.runtimes.tower import BackendUnavailable


def pick_backend(requested: Backend, device: torch.device, precision: Precision) -> Backend:
    """`auto`: the fastest runtime measured to keep parity for this device and precision
    (README, Performance): torch on GPUs; OpenVINO on CPUs, except int8 on a CPU without
    VNNI or AMX. OpenVINO's static int8 ran twice as fast as ONNX Runtime's dynamic int8
    on a Xeon with AMX, but at half its own fp32 speed on an AVX2 EPYC, where ONNX
    Runtime's int8 ran 1.5-1.9x faster than OpenVINO fp32."""
    if requested == Backend.AUTO:
        if device.type != "cpu":
            return Backend.TORCH
        if precision == Precision.INT8 and not cpu_has_int8_dot_product():
            return Backend.ONNXRUNTIME
        return Backend.OPENVINO
    if requested != Backend.TORCH and device.type != "cpu":
        raise BackendUnavailable(
            f"CLIP_BACKEND={requested} runs on the CPU only; use torch (or auto) on {device}."
        )
    refusal = precision_refusal(requested, precision)
    if refusal is not None:
        raise BackendUnavailable(f"{refusal}.")
    return requested
