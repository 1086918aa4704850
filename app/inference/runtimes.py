"""Where the image tower runs: torch, OpenVINO or ONNX Runtime, behind one call.

Every runtime takes the same normalised float32 batch (N, 3, H, W) and returns raw
features; preprocessing and the L2 normalisation around it stay in model.py, so every
backend sees the same pixels. OpenVINO and ONNX Runtime run a graph exported from the
loaded open_clip tower itself (same weights, nothing extra to ship), converted once and
cached on disk under a key made of the weights' hash, the backend, the precision and the
library versions: a restart, or a second replica on the same volume, loads it in about a
second instead of converting again.

    backend       precisions      how
    torch         fp32 fp16 bf16  weights cast; int8 = torch dynamic quantisation
    openvino      fp32 bf16 int8  IR from ov.convert_model; bf16 as an inference hint;
                                  int8 = static quantisation by NNCF, calibrated on crops
    onnxruntime   fp32 int8       torch.onnx (torch.export) export; int8 = dynamic
                                  quantisation (QInt8)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from app.config import Backend, Precision
from app.inference.calibration import Calibration
from app.inference.conversion_cache import cached
from app.inference.cpu_features import cpu_has_int8_dot_product
from app.inference.memory import page_out_files, paging_out, release_freed_memory
from app.inference.weights import WeightsUnavailable

logger = logging.getLogger(__name__)

# The largest second compiled copy of the weights CLIP_FORWARD_STREAMS=0 buys for lone
# requests' latency: it has to fit beside everything else in the 1.5 GB the service
# keeps to under load.
SECOND_COPY_MAX_BYTES = 256 * 2**20

SUPPORTED: dict[Backend, set[Precision]] = {
    Backend.TORCH: {Precision.FP32, Precision.FP16, Precision.BF16, Precision.INT8},
    Backend.OPENVINO: {Precision.FP32, Precision.BF16, Precision.INT8},
    Backend.ONNXRUNTIME: {Precision.FP32, Precision.INT8},
}


class BackendUnavailable(WeightsUnavailable):
    """The requested backend cannot run this device or precision; says what to change."""


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
    if precision not in SUPPORTED[requested]:
        choices = ", ".join(sorted(p.value for p in SUPPORTED[requested]))
        raise BackendUnavailable(
            f"CLIP_BACKEND={requested} does not run CLIP_PRECISION={precision}; it runs "
            f"{choices} (or use CLIP_BACKEND=auto)."
        )
    return requested


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


class _Turns:
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


class TorchTower:
    """torch's tower; with `streams` > 1 (CPU), that many passes at once under load,
    each on `threads / streams` of torch's threads, on the same weights: a pass no
    longer waits for a thread the HTTP side preempted, and the cores do not idle while
    the next batch is gathered. A lone request runs alone over every thread (_Turns)."""

    backend = Backend.TORCH

    def __init__(
        self, visual: torch.nn.Module, dtype: torch.dtype, streams: int = 1, threads: int = 0
    ) -> None:
        self._visual = visual
        self._dtype = dtype
        self.concurrency = max(1, streams)
        self._threads = threads or torch.get_num_threads()
        self._stream_threads = max(1, self._threads // self.concurrency)
        self._turns = _Turns(self.concurrency)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        # torch's thread count is the process's, not the calling thread's: each pass sets
        # its own, so another tower in the process (a load tool's probes) cannot leave
        # this one on a stream's share.
        if self.concurrency == 1:
            torch.set_num_threads(self._threads)
            return self._forward(pixels)
        with self._turns.turn(len(pixels)) as solo:
            torch.set_num_threads(self._threads if solo else self._stream_threads)
            return self._forward(pixels)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self._visual(pixels.to(self._dtype))
        return features

    def settle(self) -> None:
        pass


class OpenVinoTower:
    """One infer request per CPU stream; a call borrows a free one, so up to
    `concurrency` calls (from different threads) run at once.

    Streams of one thread each keep the cores busy under load, but leave a lone request
    on a single core. With a `solo` model as well (one stream over every core), a lone
    request runs on it instead (_Turns)."""

    backend = Backend.OPENVINO

    def __init__(self, compiled: Any, solo: Any = None, weights_file: Path | None = None) -> None:
        self.concurrency = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.concurrency):
            self._idle.put(compiled.create_infer_request())
        solo_wanted = solo is not None and self.concurrency > 1
        self._solo = solo.create_infer_request() if solo_wanted else None
        self._turns = _Turns(self.concurrency)
        self._weights_file = weights_file

    def settle(self) -> None:
        # Each compiled model copies the weights it maps from the IR into its own layout
        # on its first pass; after that the mapped file is never read again, yet its
        # pages (~180 MB for ViT-B-32) would stay resident.
        if self._weights_file is not None:
            page_out_files([str(self._weights_file)])

    @property
    def has_solo(self) -> bool:
        return self._solo is not None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._solo is None:
            return self._on_a_stream(pixels)
        with self._turns.turn(len(pixels)) as solo:
            return _infer(self._solo, pixels) if solo else self._on_a_stream(pixels)

    def _on_a_stream(self, pixels: torch.Tensor) -> torch.Tensor:
        request = self._idle.get()
        try:
            return _infer(request, pixels)
        finally:
            self._idle.put(request)


def _infer(request: Any, pixels: torch.Tensor) -> torch.Tensor:
    request.infer({0: pixels.numpy()}, share_inputs=True)
    return torch.from_numpy(request.get_output_tensor(0).data.copy())


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
    choice) are OpenVINO's and torch's on the CPU; ONNX Runtime runs one pass at a time.
    `weights` is weights_digest(visual) when the caller has it already (hashing ViT-B-32
    takes most of a second). OpenVINO and ONNX Runtime
    call `release_source` once the converted artefact is on disk and before loading it:
    `visual`'s weights are not read after that, and need not sit beside the runtime's."""
    if backend == Backend.TORCH:
        return _torch_tower(visual, precision, device, streams, threads)
    if backend == Backend.OPENVINO:
        if precision == Precision.INT8 and calibration is None:
            raise BackendUnavailable("OpenVINO int8 needs calibration images.")
        key = _cache_key(weights or weights_digest(visual), backend, precision, image_size,
                         calibration)  # fmt: skip
        return _openvino_tower(visual, precision, image_size, cache_dir / key, threads,
                               calibration, streams, release_source)  # fmt: skip
    key = _cache_key(weights or weights_digest(visual), backend, precision, image_size)
    return _onnxruntime_tower(visual, precision, image_size, cache_dir / key, threads,
                              release_source)  # fmt: skip


def _torch_tower(
    visual: torch.nn.Module,
    precision: Precision,
    device: torch.device,
    streams: int = 1,
    threads: int = 0,
) -> Tower:
    dtype = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}.get(
        precision, torch.float32
    )
    # Casting weights (not autocast) is what measured fastest on CPU and GPU alike.
    visual = visual.to(device=device, dtype=dtype)
    if precision == Precision.INT8:
        with warnings.catch_warnings():
            # Deprecated in favour of torchao, which is not a dependency.
            warnings.simplefilter("ignore", DeprecationWarning)
            visual = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                visual, {torch.nn.Linear}, dtype=torch.qint8
            )
    if device.type != "cpu":
        streams = 1  # a GPU runs one pass at a time
    elif streams == 0:
        # Two passes at once, each on half the threads: on 2 cores 1.06-1.07x the crops/s
        # (fp32, bf16) and 1.34x (int8) under 16 clients, a lone client's latency kept
        # by the solo turn (README, Performance). The weights are shared: no memory cost.
        streams = 2 if (threads or torch.get_num_threads()) >= 2 else 1
    return TorchTower(visual, dtype, streams, threads)


def _cache_key(
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
    if precision == Precision.INT8:
        artefact = "int8-w7" if calibration is None else f"int8-w7-{calibration.key}"
    else:
        artefact = "w16" if precision == Precision.BF16 else "fp32"
    version = _library_version(backend)
    height, width = image_size
    return f"{weights[:24]}-{backend}-{version}-{artefact}-{height}x{width}"


def _library_version(backend: Backend) -> str:
    if backend == Backend.OPENVINO:
        import openvino

        return str(openvino.__version__).split("-")[0]
    import onnxruntime

    return f"ort{onnxruntime.__version__}-torch{torch.__version__.split('+')[0]}"


def _example(image_size: tuple[int, int]) -> torch.Tensor:
    return torch.zeros((1, 3, *image_size), dtype=torch.float32)


def _openvino_tower(
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
        model = ov.convert_model(
            visual,
            example_input=_example(image_size),
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


# Libraries that log every pass of an ONNX export at INFO (hundreds of lines a start).
_CHATTY_EXPORT_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch.__trace")


def _without_preprocessing_advice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Please consider to run pre-processing")


def _export_onnx(visual: torch.nn.Module, image_size: tuple[int, int], path: Path) -> None:
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
                    (_example(image_size),),
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


def _onnxruntime_tower(
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
        _export_onnx(visual, image_size, fp32)
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
