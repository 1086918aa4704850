"""The image tower on OpenVINO: an IR converted from the loaded open_clip tower, run on
CPU streams, with a second compiled copy for lone requests where it is small; int8 is
NNCF's static quantisation, calibrated on crops."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.config import Backend, Precision
from app.inference.calibration import Calibration
from app.inference.conversion_cache import cached
from app.inference.memory import page_out_files, paging_out, release_freed_memory
from app.inference.runtimes.patch_embedding import patch_embedding_as_matmul
from app.inference.runtimes.tower import SECOND_COPY_MAX_BYTES, Streams, Tower, example_pixels

logger = logging.getLogger(__name__)


class OpenVinoTower:
    """One infer request per CPU stream (Streams).

    Streams of one thread each keep the cores busy under load, but leave a lone request
    on a single core. With a `solo` model as well (one stream over every core), a lone
    request runs on it instead."""

    backend = Backend.OPENVINO

    def __init__(self, compiled: Any, solo: Any = None, weights_file: Path | None = None) -> None:
        streams = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        requests = [compiled.create_infer_request() for _ in range(streams)]
        solo_request = solo.create_infer_request() if solo is not None and streams > 1 else None
        self._streams = Streams(requests, solo_request)
        self.concurrency = self._streams.concurrency
        self._weights_file = weights_file

    def settle(self) -> None:
        # Each compiled model copies the weights it maps from the IR into its own layout
        # on its first pass; after that the mapped file is never read again, yet its
        # pages (~180 MB for ViT-B-32) would stay resident.
        if self._weights_file is not None:
            page_out_files([str(self._weights_file)])

    @property
    def has_solo(self) -> bool:
        return self._streams.solo is not None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._streams.run(pixels, _infer)


def _infer(request: Any, pixels: torch.Tensor) -> torch.Tensor:
    request.infer({0: pixels.numpy()}, share_inputs=True)
    return torch.from_numpy(request.get_output_tensor(0).data.copy())


def openvino_tower(
    visual: torch.nn.Module,
    precision: Precision,
    image_size: tuple[int, int],
    folder: Path,
    threads: int,
    calibration: Calibration | None = None,
    streams: int = 0,
    release_source: Callable[[], None] = lambda: None,
) -> Tower:
    import openvino as ov

    def convert(staging: Path) -> None:
        with patch_embedding_as_matmul(visual, image_size, precision):
            model = ov.convert_model(
                visual,
                example_input=example_pixels(image_size),
                input=[ov.PartialShape([-1, 3, *image_size])],
            )
        if precision == Precision.INT8 and calibration is not None:
            # NNCF holds a compiled fp32 copy and SmoothQuant's rescaled weights beside
            # the graph's own (a cold start peaked at 2273 MiB). Read back from disk, the
            # graph's weights are the file's pages, given back while it works: they are
            # read again where needed, and the torch tower's go before it starts.
            fp32 = staging / "fp32.xml"
            ov.save_model(model, fp32, compress_to_fp16=False)
            del model
            release_freed_memory()
            release_source()
            weights = str(fp32.with_suffix(".bin"))
            with paging_out(lambda: page_out_files([weights])):
                model = _quantize_static(ov.Core().read_model(fp32), calibration.pixels())
            fp32.unlink()
            fp32.with_suffix(".bin").unlink()
        # bf16 inference rounds weights to 16 bits anyway: storing them as fp16 halves
        # what the compiled model keeps resident, at no cost in parity (tested).
        ov.save_model(model, staging / "tower.xml", compress_to_fp16=precision == Precision.BF16)

    artefact = cached(folder, "tower.xml", convert)
    path = artefact.path
    release_source()
    # Streams of a thread or a few each, with a batch in flight on every one: on few
    # cores a single pass across all threads stalls whenever the HTTP side preempts one
    # of them, while streams do not wait on each other (README, Performance). 0 lets
    # OpenVINO pick how many (2 on 2 cores); 1 is one stream over every core.
    streams = default_streams(visual, precision) if streams == 0 else streams
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT"}
    if streams > 1:
        config["NUM_STREAMS"] = streams
    if streams != 1:
        # Each stream's thread pinned to a core waited whenever a decode thread ran there,
        # while the other core sat idle between its batches; free to move, 16 clients got
        # 1.02-1.03x the crops/s (README, Performance). One stream: no difference.
        config["ENABLE_CPU_PINNING"] = False
    if precision != Precision.INT8:
        # int8 keeps OpenVINO's own choice for the layers it leaves unquantised: bf16
        # where the CPU has AMX, f32 elsewhere.
        config["INFERENCE_PRECISION_HINT"] = "bf16" if precision == Precision.BF16 else "f32"
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    # The weights are mapped from the file, not read into the heap: each compiled model
    # copies them into the layout (and precision) it runs on its first pass, after
    # which settle() hands the mapped pages back.
    core = ov.Core()
    model = core.read_model(path)
    compiled = core.compile_model(model, "CPU", config)
    solo = None
    if int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) > 1:
        # A second compiled copy (ViT-B-32 bf16: ~180 MB of weights in its layout)
        # buys a lone request the latency of every core: on 2 cores one stream alone
        # is 1.6x slower.
        solo_config = {**config, "PERFORMANCE_HINT": "LATENCY"}
        solo_config.pop("NUM_STREAMS", None)
        solo = core.compile_model(model, "CPU", solo_config)
    artefact.release()
    return OpenVinoTower(compiled, solo, path.with_suffix(".bin"))


def default_streams(visual: torch.nn.Module, precision: Precision) -> int:
    """What CLIP_FORWARD_STREAMS=0 means: 0 (OpenVINO's choice of streams, plus the
    second compiled copy for lone requests) when that copy is small, else 1. Each
    compiled copy keeps the weights in its own layout: for ViT-B-32 ~180 MB in bf16,
    ~90 MB in int8, but ~350 MB in fp32, which took the service to 1480-1491 MiB
    steady under 16 clients and a 2004 MiB startup peak (2360 on a cold conversion)."""
    weight_bytes = {Precision.INT8: 1, Precision.BF16: 2}.get(precision, 4)
    copy_bytes = weight_bytes * sum(p.numel() for p in visual.parameters())
    return 0 if copy_bytes <= SECOND_COPY_MAX_BYTES else 1


def _quantize_static(model: Any, pixels: torch.Tensor) -> Any:
    """int8 weights and activations, with activation scales measured on `pixels`.
    NNCF's transformer preset keeps the layers that quantise badly (softmax, layer norms,
    the attention's scores) in floating point, and SmoothQuant moves activation outliers
    into the weights first."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
    )

    nncf.set_log_level(logging.WARNING)
    dataset = nncf.Dataset([pixels[i : i + 1].numpy() for i in range(len(pixels))])
    started = time.perf_counter()
    # NNCF draws progress bars on stdout; the service's stdout is JSON log lines.
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(
            model,
            dataset,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(pixels),
            # 7-bit weights in every layer, not only the first: CPUs without VNNI
            # saturate full-range int8 dot products (min cosine to fp32 0.985 on a tiny
            # ViT on an AVX2 EPYC), and one cached graph serves every CPU of a volume.
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),
        )
    logger.info("calibrated int8 on %d images in %.1fs", len(pixels), time.perf_counter() - started)
    return quantized
