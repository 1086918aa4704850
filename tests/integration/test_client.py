"""The Python client against the ASGI app, and its retry and error behaviour."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from app.client import AsyncClipClient, ClipClient, ClipServiceError
from tests.helpers import noise_jpeg


async def test_async_client_takes_every_image_form(
    tiny_app: tuple[FastAPI, httpx.AsyncClient], tmp_path: Path
) -> None:
    app, raw = tiny_app
    crop = noise_jpeg(3)
    path = tmp_path / "crop.jpg"
    path.write_bytes(crop)
    as_pil = Image.open(path).convert("RGB")
    transport = httpx.ASGITransport(app=app)
    async with AsyncClipClient("http://test", transport=transport) as client:
        from_bytes = await client.embed(crop)
        from_path = await client.embed(path)
        from_str = await client.embed(str(path))
        from_pil = await client.embed(as_pil)
        from_array = await client.embed(np.asarray(as_pil))
        batch = await client.embed_batch([crop, path])
        half = await client.embed(crop, dtype="float16")
        same = await client.similarity(from_bytes, from_path)
        other = await client.embed(noise_jpeg(9))
        matches = await client.search([from_bytes], [other, from_bytes], top_k=1)
        outfit = await client.analyze(crop, include_embedding=True)
        with pytest.raises(ClipServiceError) as caught:
            await client.embed(b"not an image")
    assert from_bytes.shape == (64,)
    np.testing.assert_array_equal(from_bytes, from_path)
    np.testing.assert_array_equal(from_path, from_str)
    np.testing.assert_allclose(from_pil, from_array, atol=1e-6)  # both sent as PNG
    assert batch.shape == (2, 64)
    np.testing.assert_allclose(half, from_bytes, atol=2e-3)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert matches[0][0]["index"] == 1
    assert set(outfit) == {"top", "bottom", "embedding", "dtype"}
    np.testing.assert_allclose(outfit["embedding"], from_bytes, atol=1e-5)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_image"
    assert (await raw.get("/health")).status_code == 200


def test_sync_client_retries_503_after_retry_after_then_succeeds() -> None:
    calls: list[httpx.Request] = []
    vector = [0.6, 0.8]

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            error = {"error": {"code": "overloaded", "message": "queue full"}}
            return httpx.Response(503, json=error, headers={"Retry-After": "0"})
        from app.codec import encode_embedding

        return httpx.Response(
            200, json={"embedding": encode_embedding(vector), "dim": 2, "model": "m"}
        )

    with ClipClient(
        "http://svc", api_key="secret", transport=httpx.MockTransport(handler)
    ) as client:
        result = client.embed(b"jpeg bytes")
    assert result.tolist() == pytest.approx(vector)
    assert len(calls) == 3
    assert calls[0].headers["X-API-Key"] == "secret"


def test_sync_client_gives_up_with_the_servers_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "overloaded", "message": "queue full"}}
        return httpx.Response(503, json=body, headers={"Retry-After": "0"})

    transport = httpx.MockTransport(handler)
    with (
        ClipClient("http://svc", retries=2, transport=transport) as client,
        pytest.raises(ClipServiceError) as caught,
    ):
        client.similarity([1.0, 0.0], [0.0, 1.0])
    assert (caught.value.status, caught.value.code) == (503, "overloaded")


def test_non_json_errors_still_raise_typed_errors() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(502, text="bad gateway"))
    with (
        ClipClient("http://svc", transport=transport) as client,
        pytest.raises(ClipServiceError, match="502 http_error"),
    ):
        client.embed(b"x")
