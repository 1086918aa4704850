"""The service on each runtime: same answers over HTTP, and a conversion cache that
makes the second start cheap."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from app.codec import decode_embedding
from app.config import Settings
from app.inference.model import ClipImageEncoder
from app.inference.runtimes import BackendUnavailable, Tower
from app.inference.weights import WeightsUnavailable
from tests.conftest import serve
from tests.helpers import cosine, noise_jpeg


async def embed_over_http(settings: Settings) -> tuple[dict[str, object], np.ndarray]:
    async with serve(settings) as (_, client):
        info = (await client.get("/info")).json()
        response = await client.post("/embed", files={"image": ("c.jpg", noise_jpeg(5))})
        assert response.status_code == 200, response.text
        metrics = (await client.get("/metrics")).text
    assert f'backend="{info["backend"]}"' in metrics
    return info, decode_embedding(response.json()["embedding"])


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
async def test_every_backend_serves_what_torch_serves(
    tiny_settings: Callable[..., Settings], backend: str
) -> None:
    _, reference = await embed_over_http(tiny_settings())
    info, served = await embed_over_http(tiny_settings(backend=backend))
    assert (info["backend"], info["precision"]) == (backend, "fp32")
    assert cosine(served, reference) >= 0.99999


async def test_auto_runs_openvino_on_a_cpu(tiny_settings: Callable[..., Settings]) -> None:
    info, _ = await embed_over_http(tiny_settings(backend="auto"))
    assert info["backend"] == "openvino"


def test_a_warm_cache_skips_the_conversion(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        model=f"local-dir:{tiny_model_dir}", device="cpu", precision="fp32",
        backend="onnxruntime", cache_dir=str(tmp_path),
    )  # fmt: skip
    started = time.perf_counter()
    cold = ClipImageEncoder.load(settings)
    cold_s = time.perf_counter() - started
    artefacts = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.onnx"))
    started = time.perf_counter()
    warm = ClipImageEncoder.load(settings)
    warm_s = time.perf_counter() - started
    assert len(artefacts) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.onnx")) == artefacts
    batch = [cold.preprocess(Image.new("RGB", (64, 128), "red"))]
    np.testing.assert_allclose(cold.encode(batch), warm.encode(batch), atol=1e-6)
    print(f"tiny model, onnxruntime: cold start {cold_s:.2f}s, warm {warm_s:.2f}s")


def test_a_damaged_cache_entry_is_converted_again_not_served(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Weights overwritten in place (same size, so the runtime loads them) answered with
    wrong embeddings before entries carried a manifest."""
    settings = Settings(
        model=f"local-dir:{tiny_model_dir}", device="cpu", precision="fp32",
        backend="openvino", cache_dir=str(tmp_path),
    )  # fmt: skip
    clean = ClipImageEncoder.load(settings)
    batch = [clean.preprocess(Image.open(io.BytesIO(noise_jpeg(6))).convert("RGB"))]
    expected = clean.encode(batch)
    (weights,) = tmp_path.rglob("tower.bin")
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 3 : len(damaged) // 3 + 4096] = bytes(4096)
    weights.write_bytes(bytes(damaged))
    again = ClipImageEncoder.load(settings)
    assert again.info.backend == "openvino"
    np.testing.assert_allclose(again.encode(batch), expected, atol=1e-5)
    assert weights.read_bytes() != bytes(damaged)  # the entry was written anew


def operations(folder: Path) -> set[str]:
    """The operation types of the converted graph in a cache entry."""
    (graph,) = [*folder.rglob("tower.xml"), *folder.rglob("tower.int8.onnx")]
    if graph.suffix == ".xml":
        return set(re.findall(r'<layer [^>]*type="([^"]+)"', graph.read_text()))
    import onnx

    return {node.op_type for node in onnx.load(graph, load_external_data=False).graph.node}


@pytest.mark.parametrize(
    ("backend", "precision", "as_matmul"),
    [("openvino", "int8", True), ("onnxruntime", "int8", True), ("openvino", "fp32", False)],
)
def test_reduced_precision_runs_the_patch_embedding_as_a_matrix_product(
    tiny_model_dir: Path, tmp_path: Path, backend: str, precision: str, as_matmul: bool
) -> None:
    """Their convolutions lagged their matrix products (ONNX Runtime's int8 left the
    convolution in fp32): the graph has none, the entry says so in its key, and the
    answers stay torch's. fp32 gains nothing and keeps it."""
    model = f"local-dir:{tiny_model_dir}"
    reference = ClipImageEncoder.load(
        Settings(model=model, device="cpu", precision="fp32", backend="torch")
    )
    converted = ClipImageEncoder.load(
        Settings(model=model, device="cpu", precision=precision, backend=backend,
                 cache_dir=str(tmp_path))
    )  # fmt: skip
    (entry,) = tmp_path.iterdir()
    convolutions = operations(entry) & {"Convolution", "Conv", "ConvInteger", "QLinearConv"}
    assert (not convolutions) == as_matmul, convolutions
    assert (entry.name.split("-")[-2] == "mm") == as_matmul
    crops = [Image.open(io.BytesIO(noise_jpeg(seed))).convert("RGB") for seed in (1, 2)]
    batch = [converted.preprocess(crop) for crop in crops]
    floor = 0.99999 if precision == "fp32" else 0.99
    for served, expected in zip(converted.encode(batch), reference.encode(batch), strict=True):
        assert cosine(served, expected) >= floor


def test_auto_falls_back_to_torch_when_a_runtime_cannot_take_the_model(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unconvertible(*args: object) -> None:
        raise RuntimeError("operator not supported")

    monkeypatch.setattr("app.inference.runtimes.build.openvino_tower", unconvertible)
    base = {"model": f"local-dir:{tiny_model_dir}", "device": "cpu", "precision": "fp32"}
    encoder = ClipImageEncoder.load(Settings(**base, backend="auto"))
    assert encoder.info.backend == "torch"
    with pytest.raises(BackendUnavailable, match="CLIP_BACKEND=openvino"):
        ClipImageEncoder.load(Settings(**base, backend="openvino"))


def test_openvino_int8_calibrates_on_the_operators_own_crops(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    crops = tmp_path / "crops"
    crops.mkdir()
    for index, colour in enumerate(["red", "navy", "olive"]):
        Image.new("RGB", (64, 160), colour).save(crops / f"person-{index}.png")
    (crops / "notes.txt").write_text("not an image, not read")
    cache = tmp_path / "cache"
    settings = Settings(
        model=f"local-dir:{tiny_model_dir}", device="cpu", precision="int8",
        backend="openvino", cache_dir=str(cache), int8_calibration_dir=str(crops),
    )  # fmt: skip
    encoder = ClipImageEncoder.load(settings)
    assert (encoder.info.backend, encoder.info.precision) == ("openvino", "int8")
    (artefact,) = list(cache.iterdir())
    assert "-int8-w7-own3-" in artefact.name
    # The fp32 graph it was calibrated from is not kept beside the int8 one.
    assert sorted(path.suffix for path in artefact.iterdir() if path.stem == "tower") == [
        ".bin",
        ".xml",
    ]
    assert not list(artefact.glob("fp32*"))
    reference = ClipImageEncoder.load(
        Settings(model=f"local-dir:{tiny_model_dir}", device="cpu", precision="fp32")
    )
    batch = [encoder.preprocess(Image.new("RGB", (64, 160), "maroon"))]
    assert cosine(encoder.encode(batch)[0], reference.encode(batch)[0]) >= 0.99

    # Other crops are another calibration: a new artefact, not the cached one.
    Image.new("RGB", (64, 160), "teal").save(crops / "person-3.png")
    ClipImageEncoder.load(settings)
    assert len(list(cache.iterdir())) == 2


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "there is no such folder"),
        ("a file", "is a file, not a folder of crops"),
        ("empty", "holds no .jpg, .png, .webp or .bmp crops"),
        ("nested", r"holds no .jpg, .png, .webp or .bmp crops \(sub-folders are not searched"),
    ],
)
def test_a_calibration_folder_without_crops_is_refused_with_the_settings(
    tmp_path: Path, setup: str, message: str
) -> None:
    """Refused where the settings are read, not once the model has loaded."""
    crops = tmp_path / "crops"
    if setup == "a file":
        crops.write_bytes(b"crop")
    elif setup == "empty":
        crops.mkdir()
        (crops / "notes.txt").write_text("no crops here")
    elif setup == "nested":
        (crops / "person-1").mkdir(parents=True)
        Image.new("RGB", (64, 160), "teal").save(crops / "person-1" / "view-1.jpg")
    with pytest.raises(ValidationError, match=f"CLIP_INT8_CALIBRATION_DIR={crops}.*{message}"):
        Settings(precision="int8", int8_calibration_dir=str(crops))
    # Only OpenVINO's int8 calibrates: otherwise the folder is not read (a warning says so).
    assert Settings(precision="fp32", int8_calibration_dir=str(crops)).precision == "fp32"
    unused = Settings(precision="int8", backend="onnxruntime", int8_calibration_dir=str(crops))
    assert unused.backend == "onnxruntime"


def test_a_corrupt_calibration_crop_stops_the_start_with_its_reason(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    crops = tmp_path / "crops"
    crops.mkdir()
    (crops / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    settings = Settings(
        model=f"local-dir:{tiny_model_dir}", device="cpu", precision="int8",
        backend="openvino", cache_dir=str(tmp_path / "cache"), int8_calibration_dir=str(crops),
    )  # fmt: skip
    unreadable = r"CLIP_INT8_CALIBRATION_DIR.*not a readable image"
    with pytest.raises(WeightsUnavailable, match=unreadable):
        ClipImageEncoder.load(settings)


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
async def test_streams_serve_concurrent_requests_alike(
    tiny_settings: Callable[..., Settings], backend: str
) -> None:
    crops = [noise_jpeg(seed) for seed in range(12)]

    async def embed_all(settings: Settings) -> tuple[int, list[np.ndarray], np.ndarray]:
        async with serve(settings) as (_, client):
            streams = (await client.get("/info")).json()["batcher"]["forward_streams"]
            responses = await asyncio.gather(
                *(client.post("/embed", files={"image": ("c.jpg", c)}) for c in crops)
            )
            # Alone, with every stream idle: the pass over every core, where there is one.
            lone = await client.post("/embed", files={"image": ("c.jpg", crops[0])})
        assert all(r.status_code == 200 for r in [*responses, lone])
        rows = [decode_embedding(r.json()["embedding"]) for r in responses]
        return streams, rows, decode_embedding(lone.json()["embedding"])

    one, alone, _ = await embed_all(tiny_settings(backend=backend, forward_streams=1))
    two, together, lone = await embed_all(tiny_settings(backend=backend, forward_streams=2))
    assert (one, two) == (1, 2)
    for a, b in zip(alone, together, strict=True):
        assert cosine(a, b) >= 0.99999
    assert cosine(alone[0], lone) >= 0.99999


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_texts_embedded_at_load_match_the_text_tower_and_it_is_dropped_first(
    tiny_model_dir: Path, tmp_path: Path, backend: str
) -> None:
    settings = Settings(
        model=f"local-dir:{tiny_model_dir}", device="cpu", precision="fp32",
        backend=backend, cache_dir=str(tmp_path),
    )  # fmt: skip
    texts = ["a photo of a person wearing a red coat", "a photo of a person wearing jeans"]
    kept = ClipImageEncoder.load(settings)  # the text tower stays until released
    early = ClipImageEncoder.load(settings, [*texts, texts[0]])
    np.testing.assert_allclose(early.embed_texts(texts), kept.embed_texts(texts), atol=1e-6)
    np.testing.assert_allclose(early.embed_texts(texts[::-1]), kept.embed_texts(texts[::-1]))
    with pytest.raises(RuntimeError, match="a photo of a cat"):
        early.embed_texts(["a photo of a cat"])  # the tower that could is gone
    assert early.encode([early.preprocess(Image.new("RGB", (64, 128)))]).shape[0] == 1


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_the_source_weights_are_released_once_the_artefact_is_on_disk(
    tiny_model_dir: Path, tmp_path: Path, backend: str
) -> None:
    import open_clip
    import torch

    from app.config import Backend, Precision
    from app.inference.runtimes import build_tower

    visual = (
        open_clip.create_model(f"local-dir:{tiny_model_dir}").eval().requires_grad_(False).visual
    )
    seen: list[list[Path]] = []
    for _start in ("cold", "warm"):
        build_tower(
            visual, Backend(backend), Precision.FP32, torch.device("cpu"), (64, 64), tmp_path,
            threads=1, release_source=lambda: seen.append(sorted(tmp_path.rglob("tower.*"))),
        )  # fmt: skip
    # Once per start, each time with the converted tower already written.
    assert len(seen) == 2
    assert all(seen), seen


@pytest.mark.parametrize(("streams", "pinned"), [(0, False), (2, False), (1, True)])
def test_openvino_streams_may_move_between_cores(
    tiny_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    streams: int,
    pinned: bool,
) -> None:
    """A stream pinned to a core waited while a decode thread ran there, the other core
    idle: the streams' threads (and the pass over every core beside them) are left free
    to move; one stream keeps OpenVINO's default."""
    import openvino as ov

    compiled: list[object] = []
    compile_model = ov.Core.compile_model

    def recording(core: ov.Core, *args: object, **kwargs: object) -> object:
        model = compile_model(core, *args, **kwargs)  # type: ignore[arg-type]
        compiled.append(model)
        return model

    monkeypatch.setattr(ov.Core, "compile_model", recording)
    ClipImageEncoder.load(tiny_settings(backend="openvino", forward_streams=streams))
    assert compiled
    for model in compiled:
        assert model.get_property("ENABLE_CPU_PINNING") is pinned  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("threads", "streams", "sessions"),
    [(2, 0, [1, 2]), (2, 1, [2]), (2, 2, [1, 2]), (4, 2, [2, 2, 4]), (1, 0, [1])],
)
def test_onnxruntime_streams_get_their_share_of_the_threads(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    threads: int,
    streams: int,
    sessions: list[int],
) -> None:
    """A session of one thread serves every stream (calls run on their callers'
    threads); wider shares get a session each; the lone request's session has every
    thread. By default two streams where there are two threads and the weights are small
    (the tiny model's are), int8 or not."""
    import onnxruntime as ort
    import open_clip
    import torch

    from app.config import Backend, Precision
    from app.inference.runtimes import build_tower

    opened: list[int] = []
    session_class = ort.InferenceSession

    def recording(path: str, options: ort.SessionOptions, **kwargs: object) -> object:
        opened.append(options.intra_op_num_threads)
        return session_class(path, options, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ort, "InferenceSession", recording)
    visual = (
        open_clip.create_model(f"local-dir:{tiny_model_dir}").eval().requires_grad_(False).visual
    )
    tower = build_tower(
        visual, Backend.ONNXRUNTIME, Precision.FP32, torch.device("cpu"), (64, 64), tmp_path,
        threads=threads, streams=streams,
    )  # fmt: skip
    assert sorted(opened) == sessions
    assert tower.concurrency == (streams or (2 if threads >= 2 else 1))
    features = tower(torch.zeros(3, 3, 64, 64))
    assert features.shape[0] == 3


def test_onnxruntime_default_streams_count_the_cpus_not_torchs_threads(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's thread count is process state that a torch pass may have set to a
    stream's share: ONNX Runtime's default streams follow the CPUs the process has."""
    import open_clip
    import torch

    from app.config import Backend, Precision
    from app.inference.runtimes import build_tower, onnxruntime_tower

    monkeypatch.setattr(onnxruntime_tower, "usable_cpus", lambda: 2)
    visual = (
        open_clip.create_model(f"local-dir:{tiny_model_dir}").eval().requires_grad_(False).visual
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tower = build_tower(
            visual, Backend.ONNXRUNTIME, Precision.FP32, torch.device("cpu"), (64, 64), tmp_path,
            threads=0,
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert tower.concurrency == 2


def test_onnxruntime_runs_one_stream_by_default_where_a_second_session_is_large() -> None:
    """ViT-B-32's fp32 weights (~350 MB) a second time would take the service past its
    memory bound; its int8 weights (~90 MB) would not."""
    import torch

    from app.config import Precision
    from app.inference.runtimes.onnxruntime_tower import default_streams

    vit_b_32_sized = torch.nn.Linear(9000, 9800, device="meta")  # 88 M weights, no memory
    assert default_streams(vit_b_32_sized, Precision.FP32, threads=2) == 1
    assert default_streams(vit_b_32_sized, Precision.INT8, threads=2) == 2
    assert default_streams(vit_b_32_sized, Precision.INT8, threads=1) == 1


def _onnx_tower_and_reference(tiny_model_dir: Path, cache: Path) -> tuple[Tower, torch.nn.Module]:
    import open_clip

    from app.config import Backend, Precision
    from app.inference.runtimes import build_tower

    visual = (
        open_clip.create_model(f"local-dir:{tiny_model_dir}").eval().requires_grad_(False).visual
    )
    tower = build_tower(
        visual, Backend.ONNXRUNTIME, Precision.FP32, torch.device("cpu"), (64, 64), cache,
        threads=1,
    )  # fmt: skip
    return tower, visual


def lowest_agreement(tower: Tower, visual: torch.nn.Module, pixels: torch.Tensor) -> float:
    """The lowest cosine between the tower's rows and the torch tower's, one per image."""
    with torch.inference_mode():
        expected = visual(pixels)
    served = tower(pixels)
    assert served.shape == expected.shape
    return min(cosine(a.numpy(), b.numpy()) for a, b in zip(served, expected, strict=True))


@pytest.mark.parametrize("batch", [1, 3])
def test_the_onnx_export_keeps_weights_beside_the_graph_and_takes_any_batch(
    tiny_model_dir: Path, tmp_path: Path, batch: int
) -> None:
    """torch.export's exporter writes the weights to a data file (no second copy in
    memory); its example batch must not be baked into the graph."""
    tower, visual = _onnx_tower_and_reference(tiny_model_dir, tmp_path)
    (graph,) = tmp_path.rglob("tower.onnx")
    assert graph.with_name("tower.onnx.data").stat().st_size > graph.stat().st_size
    assert lowest_agreement(tower, visual, torch.randn(batch, 3, 64, 64)) >= 0.99999


def test_a_tower_torch_export_cannot_trace_takes_the_torchscript_exporter(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    export = torch.onnx.export

    def no_torch_export(*args: object, dynamo: bool = True, **kwargs: object) -> object:
        if dynamo:
            raise RuntimeError("data-dependent control flow\nmore detail")
        return export(*args, dynamo=dynamo, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.onnx, "export", no_torch_export)
    tower, visual = _onnx_tower_and_reference(tiny_model_dir, tmp_path)
    assert "TorchScript exporter" in caplog.text
    assert "data-dependent control flow" in caplog.text
    assert not list(tmp_path.rglob("*.data"))  # nothing of the failed try was kept
    assert lowest_agreement(tower, visual, torch.randn(2, 3, 64, 64)) >= 0.99999


def test_onnxruntime_int8_weights_use_seven_bits_so_no_cpu_saturates(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Without VNNI, ONNX Runtime multiplies u8 activations by s8 weights with
    VPMADDUBSW, whose 16-bit pair sums saturate on full-range weights (min cosine to
    fp32 0.97 on an AVX2 EPYC). One cached graph serves every CPU of a shared volume, so
    every graph keeps its weights within 7 bits."""
    import onnx
    from onnx import numpy_helper

    settings = Settings(
        model=f"local-dir:{tiny_model_dir}", device="cpu", precision="int8",
        backend="onnxruntime", cache_dir=str(tmp_path),
    )  # fmt: skip
    ClipImageEncoder.load(settings)
    (folder,) = list(tmp_path.iterdir())
    assert "-int8-w7-" in folder.name  # not an entry of full-range weights from before
    graph = onnx.load(str(folder / "tower.int8.onnx")).graph
    weights = [
        numpy_helper.to_array(tensor)
        for tensor in graph.initializer
        if tensor.data_type == onnx.TensorProto.INT8 and len(tensor.dims) == 2
    ]
    assert weights, "no int8 weight matrices in the quantised graph"
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64


def test_a_first_int8_start_logs_no_advice_meant_for_developers(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime's quantiser advises its own pre-processing at WARNING on every first
    start; an operator can do nothing with it."""
    settings = Settings(
        model=f"local-dir:{tiny_model_dir}", device="cpu", precision="int8",
        backend="onnxruntime", cache_dir=str(tmp_path),
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        ClipImageEncoder.load(settings)
    assert "converted the image tower" in caplog.text  # a cold start, logged
    assert "pre-processing" not in caplog.text
    assert not logging.getLogger().filters


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_more_streams_than_cores_are_capped_with_a_warning(
    tiny_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture, backend: str
) -> None:
    """CLIP_FORWARD_STREAMS=64 on 2 cores: torch and ONNX Runtime ran 64 one-thread
    passes taking turns on two cores (OpenVINO capped it), and none said a word."""
    settings = tiny_settings(backend=backend, forward_streams=64, torch_threads=2)
    with caplog.at_level(logging.WARNING, logger="app.inference.model"):
        encoder = ClipImageEncoder.load(settings)
    assert encoder.info.streams == 2
    assert f"CLIP_FORWARD_STREAMS=64, but {backend} runs 2 forward stream(s) here" in caplog.text
