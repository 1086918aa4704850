"""Health, readiness, info, the OpenAPI document, and startup failures."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.inference.weights import WeightsUnavailable
from app.main import create_app
from tests.conftest import serve


async def test_health_ready_and_info(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).status_code == 200
    info = (await client.get("/info")).json()
    assert info["dim"] == 64
    assert info["device"] == "cpu"
    assert info["precision"] == "fp32"
    assert info["image_size"] == [64, 64]
    assert info["resize_mode"] == "shortest"
    assert info["batcher"]["max_batch_size"] == 32
    assert info["batcher"]["max_wait_ms"] == 5.0
    assert info["limits"]["max_batch_images"] == 8
    assert info["version"]


async def test_ready_is_503_before_the_model_is_loaded_and_after_shutdown(
    tiny_settings: Callable[..., Settings],
) -> None:
    app = create_app(tiny_settings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        not_loaded = await client.get("/ready")
        assert not_loaded.status_code == 503
        assert not_loaded.json()["error"]["code"] == "not_ready"
        assert (await client.get("/health")).status_code == 200
        embed = await client.post("/embed", json={"image": "AAAA"})
        assert embed.status_code == 503
        assert "Retry-After" in embed.headers
        async with app.router.lifespan_context(app):
            assert (await client.get("/ready")).status_code == 200
        assert (await client.get("/ready")).status_code == 503


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
async def test_every_resize_mode_takes_extreme_shapes(
    tiny_settings: Callable[..., Settings], mode: str
) -> None:
    async with serve(tiny_settings(resize_mode=mode, warmup=False)) as (_, client):
        assert (await client.get("/info")).json()["resize_mode"] == mode
        for width, height in ((1, 1), (2, 10_000), (10_000, 2), (3, 700)):
            response = await client.post("/embed", files={"image": ("s.png", _png(width, height))})
            assert response.status_code == 200, (width, height, response.text)


def _png(width: int, height: int) -> bytes:
    from tests.helpers import image_bytes

    return image_bytes((width, height), fmt="PNG")


async def test_openapi_documents_both_input_forms_and_the_errors(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    for path in ("/embed", "/embed/batch"):
        operation = schema["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(content)
        assert {"200", "400", "413", "415", "422", "503", "504"} <= set(operation["responses"])
        assert operation["description"]
    similarity = schema["paths"]["/similarity"]["post"]
    assert "application/json" in similarity["requestBody"]["content"]
    request_schema = schema["components"]["schemas"]["SearchSimilarityRequest"]
    assert request_schema["properties"]["top_k"]["description"]
    # Every component is referenced: a generated client gets no class nobody sends.
    text = json.dumps(schema)
    for name in schema["components"]["schemas"]:
        assert f'"#/components/schemas/{name}"' in text, name
    assert schema["components"]["schemas"]["EmbedResponse"]["properties"]["embedding"]["examples"]
    docs = await client.get("/docs")
    assert docs.status_code == 200
    # every asset the page loads is served by the app itself, none from a CDN
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets
    for asset in assets:
        assert asset.startswith("/"), asset
        assert (await client.get(asset)).status_code == 200, asset
    redoc = await client.get("/redoc")
    for asset in re.findall(r'src="([^"]+)"', redoc.text):
        assert asset.startswith("/"), asset


async def test_startup_fails_fast_naming_the_setting(tmp_path: Path) -> None:
    settings = Settings(model=f"local-dir:{tmp_path / 'missing'}", device="cpu")
    app = create_app(settings)
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="CLIP_MODEL=local-dir:"):
        async with app.router.lifespan_context(app):
            pass
    assert time.monotonic() - started < 10


async def test_cuda_requested_where_there_is_none_is_a_clear_startup_error(
    tiny_settings: Callable[..., Settings],
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    app = create_app(tiny_settings(device="cuda"))
    with pytest.raises(WeightsUnavailable, match="CLIP_DEVICE=cuda"):
        async with app.router.lifespan_context(app):
            pass


async def test_draining_refuses_new_work_and_turns_ready_off(
    tiny_settings: Callable[..., Settings],
) -> None:
    async with serve(tiny_settings(warmup=False)) as (app, client):
        app.state.draining = True
        ready = await client.get("/ready")
        embed = await client.post("/embed", json={"image": "AAAA"})
        health = await client.get("/health")
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "shutting_down"
    assert embed.status_code == 503
    assert embed.headers["Retry-After"]
    assert health.status_code == 200
