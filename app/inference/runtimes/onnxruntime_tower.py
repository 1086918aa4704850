"""The image tower on ONNX Runtime: an ONNX graph exported from the loaded open_clip
tower; int8 is ONNX Runtime's dynamic quantisation of it."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.config import Backend, Precision
from app.inference.conversion_cache import cached
from app.inference.runtimes.tower import Tower, example_pixels

logger = logging.getLogger(__name__)


class OnnxRuntimeTower:
    backend = Backend.ONNXRUNTIME
    concurrency = 1

    def __init__(self, session: Any) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        (features,) = self._session.run(None, {self._input: pixels.numpy()})
        return torch.from_numpy(np.asarray(features, dtype=np.float32))

    def settle(self) -> None:
        pass


# Libraries that log every pass of an ONNX export at INFO (hundreds of lines a start).
_CHATTY_EXPORT_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch.__trace")


def _without_preprocessing_advice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Please consider to run pre-processing")


def export_onnx(visual: torch.nn.Module, image_size: tuple[int, int], path: Path) -> None:
    """The tower as ONNX at `path`, its weights in a data file beside it.

    torch.export's exporter writes the weights tensor by tensor from where they lie:
    on ViT-B-32 it added nothing to the process's peak, where the TorchScript exporter
    held the model twice more in memory (+1 GB: a first start peaked past 2 GB). A
    tower torch.export cannot trace takes the TorchScript exporter."""
    # The fused attention kernel torch picks for inference has no ONNX symbol.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    levels = {name: logging.getLogger(name).level for name in _CHATTY_EXPORT_LOGGERS}
    try:
        for name in levels:
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                # An example batch of 1 would be specialised: the graph would take 1 only.
                torch.onnx.export(
                    visual,
                    (torch.zeros((2, 3, *image_size), dtype=torch.float32),),
                    str(path),
                    input_names=["pixels"],
                    output_names=["features"],
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    opset_version=18,
                    dynamo=True,
                    external_data=True,
                    verbose=False,
                )
            except Exception as exc:
                logger.warning(
                    "torch.export could not export the image tower (%s); using the "
                    "TorchScript exporter, which holds more memory while it runs",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
                for part in path.parent.glob(f"{path.name}*"):
                    part.unlink()
                torch.onnx.export(
                    visual,
                    (example_pixels(image_size),),
                    str(path),
                    input_names=["pixels"],
                    output_names=["features"],
                    dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def onnxruntime_tower(
    visual: torch.nn.Module,
    precision: Precision,
    image_size: tuple[int, int],
    folder: Path,
    threads: int,
    release_source: Callable[[], None] = lambda: None,
) -> Tower:
    import onnxruntime as ort

    def export(staging: Path) -> None:
        fp32 = staging / "tower.onnx"
        export_onnx(visual, image_size, fp32)
        if precision == Precision.INT8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # The fp32 graph is on disk: the tower's mapped weights need not stay
            # resident while the quantiser holds its own copies.
            release_source()
            # The quantiser advises its own pre-processing on the root logger, at every
            # first start: advice to whoever wrote this call, not to the operator.
            root = logging.getLogger()
            root.addFilter(_without_preprocessing_advice)
            try:
                # 7-bit weights: CPUs without VNNI (AVX2, AVX-512 before Cascade Lake)
                # multiply u8 by s8 with VPMADDUBSW, whose 16-bit pair sums saturate on
                # full-range weights (min cosine to fp32 0.97 on an AVX2 EPYC, 0.9997
                # with 7 bits, at the same speed). VNNI has no such limit, but one entry
                # serves every CPU that shares the cache.
                quantize_dynamic(
                    fp32,
                    staging / "tower.int8.onnx",
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    reduce_range=True,
                )
            finally:
                root.removeFilter(_without_preprocessing_advice)
            for part in staging.glob("tower.onnx*"):
                part.unlink()

    filename = "tower.int8.onnx" if precision == Precision.INT8 else "tower.onnx"
    artefact = cached(folder, filename, export)
    release_source()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(artefact.path), options, providers=["CPUExecutionProvider"])
    artefact.release()
    return OnnxRuntimeTower(session)
