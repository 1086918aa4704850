"""The service on each runtime: same answers over HTTP, and a conversion cache that
makes the second start cheap."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.codec import decode_embedding
from app.config import Settings
from app.inference.model import ClipImageEncoder
from app.inference.runtimes import BackendUnavailable
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


def test_auto_falls_back_to_torch_when_a_runtime_cannot_take_the_model(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unconvertible(*args: object) -> None:
        raise RuntimeError("operator not supported")

    monkeypatch.setattr("app.inference.runtimes._openvino_tower", unconvertible)
    base = {"model": f"local-dir:{tiny_model_dir}", "device": "cpu", "precision": "fp32"}
    encoder = ClipImageEncoder.load(Settings(**base, backend="auto"))
    assert encoder.info.backend == "torch"
    with pytest.raises(BackendUnavailable, match="CLIP_BACKEND=openvino"):
        ClipImageEncoder.load(Settings(**base, backend="openvino"))
