"""The tower ready to run, for a backend and precision: built by its runtime, converted
once and cached on disk under a key of the weights' hash and everything else the
converted artefact depends on."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from app.config import Backend, Precision
from app.inference.calibration import Calibration
from app.inference.runtimes.onnxruntime_tower import onnxruntime_tower
from app.inference.runtimes.openvino_tower import openvino_tower
from app.inference.runtimes.patch_embedding import exported_as_matmul
from app.inference.runtimes.torch_tower import torch_tower
from app.inference.runtimes.tower import BackendUnavailable, Tower


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clip-reid"


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def build_tower(
    visual: torch.nn.Module,
    backend: Backend,
    precision: Precision,
    device: torch.device,
    image_size: tuple[int, int],
    cache_dir: Path,
    threads: int,
    calibration: Calibration | None = None,
    streams: int = 0,
    weights: str = "",
    release_source: Callable[[], None] = lambda: None,
) -> Tower:
    """The tower ready to run. `visual` is the fp32 open_clip tower on the CPU; for the
    torch backend it is cast (or quantised) in place and moved to `device`.
    `calibration` is needed by OpenVINO's static int8 only; `streams` (0: the runtime's
    choice) are passes run at once on the CPU.
    `weights` is weights_digest(visual) when the caller has it already (hashing ViT-B-32
    takes most of a second). OpenVINO and ONNX Runtime
    call `release_source` once the converted artefact is on disk and before loading it:
    `visual`'s weights are not read after that, and need not sit beside the runtime's."""
    if backend == Backend.TORCH:
        return torch_tower(visual, precision, device, streams, threads)
    if backend == Backend.OPENVINO:
        if precision == Precision.INT8 and calibration is None:
            raise BackendUnavailable("OpenVINO int8 needs calibration images.")
        key = cache_key(weights or weights_digest(visual), backend, precision, image_size,
                        calibration)  # fmt: skip
        return openvino_tower(visual, precision, image_size, cache_dir / key, threads,
                              calibration, streams, release_source)  # fmt: skip
    key = cache_key(weights or weights_digest(visual), backend, precision, image_size)
    return onnxruntime_tower(visual, precision, image_size, cache_dir / key, threads,
                             streams, release_source)  # fmt: skip


def cache_key(
    weights: str,
    backend: Backend,
    precision: Precision,
    image_size: tuple[int, int],
    calibration: Calibration | None = None,
) -> str:
    # OpenVINO's bf16 runs a graph whose weights are stored in 16 bits (half the memory);
    # int8 is the quantised graph (OpenVINO's depends on the images it calibrated on);
    # everything else the fp32 export.
    # "int8-w7": 7-bit weights; entries named "int8" before them hold full-range
    # weights, which saturate on CPUs without VNNI.
    # "mm": the patch embedding exported as a matrix product (runtimes/patch_embedding.py);
    # bf16 and int8 entries without it hold the slower convolution.
    if precision == Precision.INT8:
        artefact = "int8-w7" if calibration is None else f"int8-w7-{calibration.key}"
    else:
        artefact = "w16" if precision == Precision.BF16 else "fp32"
    if exported_as_matmul(precision):
        artefact = f"{artefact}-mm"
    version = _library_version(backend)
    height, width = image_size
    return f"{weights[:24]}-{backend}-{version}-{artefact}-{height}x{width}"


def _library_version(backend: Backend) -> str:
    if backend == Backend.OPENVINO:
        import openvino

        return str(openvino.__version__).split("-")[0]
    import onnxruntime

    return f"ort{onnxruntime.__version__}-torch{torch.__version__.split('+')[0]}"
