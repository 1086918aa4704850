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
from app.inference.cpu_features import usable_cpus
from app.inference.runtimes.patch_embedding import patch_embedding_as_matmul
from app.inference.runtimes.tower import SECOND_COPY_MAX_BYTES, Streams, Tower, example_pixels

logger = logging.getLogger(__name__)


class OnnxRuntimeTower:
    """ONNX Runtime sessions (Streams): one pass at a time, or with several streams that
    many at once under load, and a lone request on `solo`, a session over every core.
    A session of one intra-op thread runs each call on its caller's thread, so one
    session may stand for several streams."""

    backend = Backend.ONNXRUNTIME

    def __init__(self, streams: list[Any], solo: Any = None) -> None:
        self._streams = Streams(streams, solo)
        self.concurrency = self._streams.concurrency
        self._input = streams[0].get_inputs()[0].name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._streams.run(pixels, self._run)

    def _run(self, session: Any, pixels: torch.Tensor) -> torch.Tensor:
        (features,) = session.run(None, {self._input: pixels.numpy()})
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
    streams: int = 0,
    release_source: Callable[[], None] = lambda: None,
) -> Tower:
    import onnxruntime as ort

    def export(staging: Path) -> None:
        fp32 = staging / "tower.onnx"
        with patch_embedding_as_matmul(visual, image_size, precision):
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
    cores = threads or usable_cpus()
    # A stream needs a core of its own: more only take turns on the same ones.
    streams = default_streams(visual, precision, cores) if streams == 0 else min(streams, cores)

    def session(intra_op_threads: int) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(artefact.path), options, providers=["CPUExecutionProvider"])

    if streams == 1:
        tower = OnnxRuntimeTower([session(threads)])  # 0: ONNX Runtime sizes its own pool
    else:
        share = max(1, cores // streams)
        # A session of one thread runs each call on its caller's thread, so one serves
        # every stream; wider shares need a session (and thread pool) of their own each.
        if share == 1:
            sessions = [session(1)] * streams
        else:
            sessions = [session(share) for _ in range(streams)]
        tower = OnnxRuntimeTower(sessions, solo=session(cores))
    artefact.release()
    return tower


def default_streams(visual: torch.nn.Module, precision: Precision, threads: int) -> int:
    """What CLIP_FORWARD_STREAMS=0 means for ONNX Runtime: two passes at once where
    there are two threads and the session a lone request runs on (another copy of the
    weights: ~120 MB for ViT-B-32 in int8, ~350 MB in fp32) is small, else one.

    One ONNX Runtime pass does not keep two cores busy: on a 2-core Zen 4, int8, two
    one-thread sessions side by side ran 55-57 images/s against 42-43 for one session
    of two threads (README, Performance)."""
    if threads < 2:
        return 1
    weight_bytes = 1 if precision == Precision.INT8 else 4
    copy_bytes = weight_bytes * sum(p.numel() for p in visual.parameters())
    return 2 if copy_bytes <= SECOND_COPY_MAX_BYTES else 1
