"""The Python client against the ASGI app, and its retry and error behaviour."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from app import client as client_module
from app.client import (
    AsyncClipClient,
    ClipClient,
    ClipClientError,
    ClipConnectionError,
    ClipServiceError,
    image_bytes,
)
from app.codec import decode_embedding, encode_embedding
from tests.helpers import cosine, noise_jpeg


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
        outfit_half = await client.analyze(crop, include_embedding=True, dtype="float16")
        with pytest.raises(ClipServiceError) as caught:
            await client.embed(b"not an image")
    assert from_bytes.shape == (64,)
    np.testing.assert_array_equal(from_bytes, from_path)
    np.testing.assert_array_equal(from_path, from_str)
    np.testing.assert_allclose(from_pil, from_array, atol=1e-6)  # both sent as PNG
    assert batch.shape == (2, 64)
    np.testing.assert_allclose(half, from_bytes, atol=2e-3)
    assert outfit_half["embedding"].dtype == np.float32
    np.testing.assert_allclose(outfit_half["embedding"], outfit["embedding"], atol=2e-3)
    # rounded to 16 bits on the wire: asked for, not float32 under another name
    assert not np.array_equal(outfit_half["embedding"], outfit["embedding"])
    assert outfit_half["top"] == outfit["top"]
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
        ClipClient("http://svc", retries=0, transport=transport) as client,
        pytest.raises(ClipServiceError, match="502 http_error") as caught,
    ):
        client.embed(b"x")
    assert "bad gateway" in caught.value.message


def test_a_foreign_servers_page_is_named_not_carried() -> None:
    """Another server on the port answers with a page of HTML: the error says what to
    check, on one line, and keeps only the start of the page."""
    page = "<html>\n<head><title>404 Not Found</title></head>\n" + "<p>filler</p>\n" * 500
    transport = httpx.MockTransport(
        lambda request: httpx.Response(404, text=page, headers={"content-type": "text/html"})
    )
    with (
        ClipClient("http://svc:8080", retries=0, transport=transport) as client,
        pytest.raises(ClipServiceError) as caught,
    ):
        client.embed(b"x")
    message = caught.value.message
    assert (caught.value.status, caught.value.code) == (404, "http_error")
    assert "text/html" in message
    assert "http://svc:8080 is another server" in message
    assert "404 Not Found" in message
    assert "\n" not in message
    assert len(message) < 300


class _LoopBridge(httpx.BaseTransport):
    """A sync transport that runs each request through an ASGI transport on the test's
    event loop. The app (and its batcher) lives on that loop, so the sync client, run in a
    worker thread, reaches the very app the async client talks to."""

    def __init__(self, app: FastAPI, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = httpx.ASGITransport(app=app)
        self._loop = loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # the body as bytes, which the async transport can stream too

        async def forward() -> httpx.Response:
            response = await self._inner.handle_async_request(request)
            # Raw bytes with the original headers: the new response decodes them itself.
            raw = b"".join([part async for part in response.aiter_raw()])
            await response.aclose()
            return httpx.Response(response.status_code, headers=response.headers, content=raw)

        return asyncio.run_coroutine_threadsafe(forward(), self._loop).result(timeout=120)


def _pixels(seed: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(noise_jpeg(seed))).convert("RGB"))


def _closed_port_url() -> str:
    """A local port nothing listens on: bound, then released (safer than a fixed port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_sync_and_async_clients_give_the_same_answers(
    tiny_app: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, _ = tiny_app
    crop, other = noise_jpeg(4), noise_jpeg(5)
    as_float = _pixels(4).astype(np.float32) / 255.0
    loop = asyncio.get_running_loop()

    def sync_calls() -> dict[str, Any]:
        with ClipClient("http://test", transport=_LoopBridge(app, loop)) as sync:
            a, b = sync.embed(crop), sync.embed(other)
            results: dict[str, Any] = {
                "embed": a,
                "half": sync.embed(crop, dtype="float16"),
                "float_image": sync.embed(as_float),
                "batch": sync.embed_batch([crop, other]),
                "similarity": sync.similarity(a, b),
                "search": sync.search([a, b], [b, a], top_k=2),
                "analyze": sync.analyze(crop, include_embedding=True),
            }
            with pytest.raises(ClipServiceError) as caught:
                sync.embed(b"not an image")
            results["error"] = (caught.value.status, caught.value.code)
            with pytest.raises(ValueError, match="at least one image"):
                sync.embed_batch([])
        return results

    # In a thread: the sync client blocks, and the app it calls runs on this loop.
    from_sync = await asyncio.to_thread(sync_calls)
    async with AsyncClipClient("http://test", transport=httpx.ASGITransport(app=app)) as aio:
        a, b = await aio.embed(crop), await aio.embed(other)
        from_async: dict[str, Any] = {
            "embed": a,
            "half": await aio.embed(crop, dtype="float16"),
            "float_image": await aio.embed(as_float),
            "batch": await aio.embed_batch([crop, other]),
            "similarity": await aio.similarity(a, b),
            "search": await aio.search([a, b], [b, a], top_k=2),
            "analyze": await aio.analyze(crop, include_embedding=True),
        }
        with pytest.raises(ClipServiceError) as caught:
            await aio.embed(b"not an image")
        from_async["error"] = (caught.value.status, caught.value.code)
        with pytest.raises(ValueError, match="at least one image"):
            await aio.embed_batch([])

    assert from_sync.keys() == from_async.keys()
    for name in ("embed", "half", "float_image", "batch"):
        assert from_sync[name].dtype == from_async[name].dtype == np.float32, name
        np.testing.assert_allclose(from_sync[name], from_async[name], atol=1e-6, err_msg=name)
    assert from_sync["batch"].shape == (2, 64)
    assert from_sync["similarity"] == pytest.approx(from_async["similarity"], abs=1e-6)
    # Same vectors in, same deterministic server code: the matches are equal, not close.
    assert from_sync["search"] == from_async["search"]
    assert [m["index"] for m in from_sync["search"][0]] == [1, 0]
    sync_outfit, async_outfit = from_sync["analyze"], from_async["analyze"]
    assert sync_outfit.keys() == async_outfit.keys()
    np.testing.assert_allclose(sync_outfit["embedding"], async_outfit["embedding"], atol=1e-6)
    assert sync_outfit["top"] == async_outfit["top"]
    assert sync_outfit["bottom"] == async_outfit["bottom"]
    assert from_sync["error"] == from_async["error"] == (400, "invalid_image")


async def test_empty_batch_is_refused_before_any_request() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(415, json={"error": {"code": "x", "message": "y"}})

    with (
        ClipClient("http://svc", transport=httpx.MockTransport(handler)) as sync,
        pytest.raises(ValueError, match="embed_batch needs at least one image"),
    ):
        sync.embed_batch([])
    async with AsyncClipClient("http://svc", transport=httpx.MockTransport(handler)) as aio:
        with pytest.raises(ValueError, match="embed_batch needs at least one image"):
            await aio.embed_batch([])
    assert calls == []


async def test_a_float_image_in_0_to_1_embeds_as_the_uint8_image_it_came_from(
    tiny_app: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, _ = tiny_app
    pixels = _pixels(6)
    async with AsyncClipClient("http://test", transport=httpx.ASGITransport(app=app)) as aio:
        reference = await aio.embed(pixels)
        unit_float32 = await aio.embed(pixels.astype(np.float32) / 255.0)
        unit_float64 = await aio.embed(pixels / 255.0)
        byte_range_float = await aio.embed(pixels.astype(np.float32))
        other = await aio.embed(_pixels(7))
    assert cosine(unit_float32, reference) >= 0.999
    assert cosine(unit_float64, reference) >= 0.999
    assert cosine(byte_range_float, reference) >= 0.999
    assert cosine(other, reference) < 0.999  # the bar above tells images apart


def _png_pixels(array: np.ndarray) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_bytes(array))))


def test_numpy_images_are_read_by_dtype_and_range() -> None:
    pixels = _pixels(8)
    np.testing.assert_array_equal(_png_pixels(pixels / 255.0), pixels)
    np.testing.assert_array_equal(_png_pixels(pixels.astype(np.float16) / 255.0), pixels)
    np.testing.assert_array_equal(_png_pixels(pixels.astype(np.float32) + 0.3), pixels)
    np.testing.assert_array_equal(_png_pixels(pixels.astype(np.int64)), pixels)
    grey = np.linspace(0.0, 1.0, 12).reshape(3, 4)
    np.testing.assert_array_equal(_png_pixels(grey), np.rint(grey * 255).astype(np.uint8))
    rgba = np.full((4, 4, 4), 9, dtype=np.uint16)
    np.testing.assert_array_equal(_png_pixels(rgba), rgba.astype(np.uint8))


@pytest.mark.parametrize(
    ("array", "says"),
    [
        (np.full((4, 4, 3), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.full((4, 4, 3), np.inf), "NaN or infinite"),
        (np.full((4, 4, 3), -0.5, dtype=np.float32), r"values in \[-0.5, -0.5\]"),
        (np.full((4, 4, 3), 255.6, dtype=np.float32), "values in"),
        (np.full((4, 4, 3), 300, dtype=np.uint16), r"values in \[300, 300\]"),
        (np.full((4, 4, 3), -1, dtype=np.int8), "values in"),
        (np.ones((4, 4, 3), dtype=bool), "dtype bool"),
        (np.zeros((4, 4, 2), dtype=np.uint8), r"shape \(4, 4, 2\)"),
        (np.zeros((2, 4, 4, 3), dtype=np.float32), "shape"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "shape"),
    ],
)
def test_bad_numpy_images_are_refused_saying_what_is_accepted(array: np.ndarray, says: str) -> None:
    with pytest.raises(ValueError, match=says) as caught:
        image_bytes(array)
    assert "(H, W), (H, W, 3) or (H, W, 4)" in str(caught.value)
    assert "0..1" in str(caught.value)


async def test_a_service_that_is_down_raises_clip_connection_error() -> None:
    url = _closed_port_url()
    with ClipClient(url, retries=0) as sync, pytest.raises(ClipConnectionError) as caught:
        sync.embed(b"jpeg bytes")
    assert url in str(caught.value)
    assert "running" in str(caught.value)
    assert caught.value.url == url
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    async with AsyncClipClient(url, retries=0) as aio:
        # One `except ClipClientError` covers both "down" and "answered with an error".
        with pytest.raises(ClipClientError) as base:
            await aio.similarity([1.0, 0.0], [0.0, 1.0])
    assert isinstance(base.value, ClipConnectionError)
    assert not isinstance(base.value, ClipServiceError)
    assert issubclass(ClipServiceError, ClipClientError)


def test_refused_connections_are_retried_then_succeed(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"embedding": encode_embedding([0.6, 0.8])})

    with ClipClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        assert client.embed(b"jpeg bytes").tolist() == pytest.approx([0.6, 0.8])
    assert len(calls) == 3
    # A backoff of 0.5 then 1 s, each stretched by up to as much again at random.
    assert len(waits) == 2
    assert 0.5 <= waits[0] <= 1.0
    assert 1.0 <= waits[1] <= 2.0


def test_a_connection_dropped_mid_request_is_not_called_unreachable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError(
            "Server disconnected without sending a response.", request=request
        )

    transport = httpx.MockTransport(handler)
    with (
        ClipClient("http://svc", transport=transport) as client,
        pytest.raises(ClipConnectionError) as caught,
    ):
        client.embed(b"jpeg bytes")
    message = caught.value.args[0]
    assert "closed the connection without an answer" in message
    assert "cannot reach" not in message
    assert ".." not in message


async def test_timeouts_are_not_retried_and_raise_clip_connection_error() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadTimeout("timed out", request=request)

    transport = httpx.MockTransport(handler)
    async with AsyncClipClient("http://svc", timeout_s=5, transport=transport) as aio:
        with pytest.raises(ClipConnectionError, match=r"no answer .* http://svc within 5 s"):
            await aio.embed(b"jpeg bytes")
    assert len(calls) == 1


async def test_similarity_of_float16_strings_needs_and_takes_their_dtype(
    tiny_app: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    """Issue 12: float16 base64 sent as float32 used to come back as a wrong number."""
    app, client = tiny_app
    crops = [noise_jpeg(seed) for seed in (5, 6)]
    async with AsyncClipClient("http://test", transport=httpx.ASGITransport(app=app)) as clip:
        halves = [
            (await client.post("/embed?dtype=float16", files={"image": ("c.jpg", c)})).json()[
                "embedding"
            ]
            for c in crops
        ]
        with pytest.raises(ClipServiceError) as refused:
            await clip.similarity(halves[0], halves[1])
        score = await clip.similarity(halves[0], halves[1], dtype="float16")
        ranked = await clip.search([halves[0]], halves, top_k=1, dtype="float16")
    assert refused.value.status == 422
    assert "float16" in refused.value.message
    truth = cosine(
        client_module.decode_embedding(halves[0], "float16"), decode_embedding(halves[1], "float16")
    )
    assert score == pytest.approx(truth, abs=1e-4)
    assert ranked[0][0]["index"] == 0


async def test_embed_frame_sync_and_async_agree_with_embed_of_the_crops(
    tiny_app: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, _ = tiny_app
    frame = Image.fromarray(np.concatenate([_pixels(6), _pixels(7)], axis=1))  # 256x256
    boxes = np.array([[0.5, 10.0, 100.0, 200.0], [130, 0, 256, 256]])
    loop = asyncio.get_running_loop()

    def sync_calls() -> tuple[Any, Any]:
        with ClipClient("http://test", transport=_LoopBridge(app, loop)) as sync:
            return sync.embed_frame(frame, boxes, analyze=True), sync.embed_frame(frame, [])

    from_sync, empty = await asyncio.to_thread(sync_calls)
    async with AsyncClipClient("http://test", transport=httpx.ASGITransport(app=app)) as aio:
        from_async = await aio.embed_frame(frame, boxes.tolist(), analyze=True)
        half = await aio.embed_frame(frame, boxes, dtype="float16")
        crops = [await aio.embed(frame.crop(tuple(box))) for box in from_async.boxes]

    assert from_sync.boxes == from_async.boxes == [[0, 10, 100, 200], [130, 0, 256, 256]]
    assert from_sync.embeddings.shape == (2, 64)
    np.testing.assert_allclose(from_sync.embeddings, from_async.embeddings, atol=1e-6)
    for row, crop in zip(from_async.embeddings, crops, strict=True):
        assert cosine(row, crop) >= 0.99999
    assert from_sync.descriptors == from_async.descriptors
    assert from_sync.descriptors is not None
    assert len(from_sync.descriptors) == 2
    assert half.descriptors is None
    assert half.embeddings.dtype == np.float32
    assert cosine(half.embeddings[0], from_async.embeddings[0]) >= 0.999
    assert empty.embeddings.shape == (0, 64)
    assert empty.boxes == []


@pytest.mark.parametrize(
    "boxes",
    [
        [[10, 20, 100, 200, 30, 40, 120, 220]],
        [10, 20, 100, 200],
        [[10, 20, 100]],
        [[True, 20, 100, 200]],
        [["10", 20, 100, 200]],
        np.zeros((2, 5)),
        np.zeros((1, 2, 4)),
    ],
)
def test_embed_frame_refuses_boxes_the_service_would_refuse_before_sending(boxes: Any) -> None:
    def no_request(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing should be sent")

    transport = httpx.MockTransport(no_request)
    refused = pytest.raises(ValueError, match="boxes")
    with ClipClient("http://test", transport=transport) as client, refused:
        client.embed_frame(noise_jpeg(1), boxes)


@pytest.mark.parametrize(
    ("queries", "gallery", "name"),
    [
        (np.ones(4, np.float32), [np.ones(4, np.float32)], "queries"),
        ([np.ones(4, np.float32)], np.ones(4, np.float32), "gallery"),
        ("AAAAAA==", [np.ones(4, np.float32)], "queries"),
    ],
)
def test_search_refuses_one_vector_where_it_takes_several_before_sending(
    queries: Any, gallery: Any, name: str
) -> None:
    def no_request(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing should be sent")

    refused = pytest.raises(ValueError, match=f"{name} takes a list of embeddings")
    with ClipClient("http://test", transport=httpx.MockTransport(no_request)) as client, refused:
        client.search(queries, gallery)


def test_wait_until_ready_waits_through_refusals_and_loading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client started beside the service: refused while Python imports, then 503
    `not_ready` while the model loads (Retry-After 5, polled every 2 s at most)."""
    waits: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    answers = ["refused", "refused", 503, 503, 200]

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/ready"
        answer = answers.pop(0)
        if answer == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        if answer == 503:
            error = {"code": "not_ready", "message": "the model is loading"}
            return httpx.Response(503, json={"error": error}, headers={"Retry-After": "5"})
        return httpx.Response(200, json={"status": "ready"})

    with ClipClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        client.wait_until_ready(timeout_s=60)
    assert answers == []
    assert waits == [0.5, 1.0, 2.0, 2.0]


async def test_wait_until_ready_gives_up_at_its_timeout_saying_why() -> None:
    def loading(request: httpx.Request) -> httpx.Response:
        error = {"code": "not_ready", "message": "the model is loading"}
        return httpx.Response(503, json={"error": error}, headers={"Retry-After": "0.05"})

    async with AsyncClipClient("http://svc", transport=httpx.MockTransport(loading)) as aio:
        with pytest.raises(ClipServiceError, match=r"not ready within 0.3 s: the model") as err:
            await aio.wait_until_ready(timeout_s=0.3)
    assert err.value.code == "not_ready"

    def refusing(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    refused = pytest.raises(ClipConnectionError, match=r"not ready within 0.2 s")
    with ClipClient("http://svc", transport=httpx.MockTransport(refusing)) as client, refused:
        client.wait_until_ready(timeout_s=0.2)

    def wrong_url(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no such path"}})

    not_found = pytest.raises(ClipServiceError, match="404 not_found")
    with ClipClient("http://svc", transport=httpx.MockTransport(wrong_url)) as client, not_found:
        client.wait_until_ready(timeout_s=60)


def test_wait_until_ready_keeps_its_timeout_against_a_port_that_never_answers() -> None:
    """A frozen service (SIGSTOP) accepts connections and answers nothing: each poll
    must end with the wait, not after the client's own 60 s timeout_s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with ClipClient(url, timeout_s=60) as client, pytest.raises(ClipConnectionError):
            client.wait_until_ready(timeout_s=1.0)
        assert time.monotonic() - started < 5


# --- answers of another shape: another server on the port, a proxy ------------------

# Each call with the field the client reads first from its answer.
_EVERY_CALL: list[tuple[str, str, Callable[[Any], Any]]] = [
    ("embed", "embedding", lambda c: c.embed(b"x")),
    ("embed_batch", "embeddings", lambda c: c.embed_batch([b"x", b"y"])),
    ("embed_frame", "embeddings", lambda c: c.embed_frame(b"x", [[0, 0, 8, 16]])),
    ("embed_frame_empty", "embeddings", lambda c: c.embed_frame(b"x", [])),
    ("similarity", "similarity", lambda c: c.similarity([1.0, 0.0], [0.0, 1.0])),
    ("search", "matches", lambda c: c.search([[1.0, 0.0]], [[0.0, 1.0]])),
    ("analyze", "top", lambda c: c.analyze(b"x")),
]
_CALL_IDS = [name for name, _, _ in _EVERY_CALL]


def _hello(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"hello": "world"})


def _assert_unexpected(error: ClipServiceError, says: str, status: int = 200) -> None:
    assert (error.status, error.code) == (status, "unexpected_answer")
    assert "the answer is not this service's" in error.message
    assert says in error.message
    assert "http://svc:8080 is another server" in error.message
    assert "\n" not in error.message


@pytest.mark.parametrize(("name", "field", "call"), _EVERY_CALL, ids=_CALL_IDS)
def test_a_foreign_200_is_a_service_error_naming_the_missing_field(
    name: str, field: str, call: Callable[[ClipClient], Any]
) -> None:
    """A 200 of another server's JSON used to raise KeyError (or, from analyze, come back
    as if it were an outfit)."""
    with (
        ClipClient("http://svc:8080", transport=httpx.MockTransport(_hello)) as client,
        pytest.raises(ClipServiceError) as caught,
    ):
        call(client)
    _assert_unexpected(caught.value, f"no {field!r} field")
    assert "hello" in caught.value.message  # the start of what it said


@pytest.mark.parametrize(("name", "field", "call"), _EVERY_CALL, ids=_CALL_IDS)
async def test_a_foreign_200_is_a_service_error_for_the_async_client_too(
    name: str, field: str, call: Callable[[AsyncClipClient], Any]
) -> None:
    async with AsyncClipClient("http://svc:8080", transport=httpx.MockTransport(_hello)) as aio:
        with pytest.raises(ClipClientError) as caught:
            await call(aio)
    assert isinstance(caught.value, ClipServiceError)
    _assert_unexpected(caught.value, f"no {field!r} field")


@pytest.mark.parametrize(
    ("status", "answer", "says"),
    [
        (200, {"text": "OK"}, "not JSON"),
        (200, {"content": b"\xff\xfe\x00\x81"}, "not JSON"),
        (200, {"text": "<html><body>It works!</body></html>"}, "not JSON"),
        (200, {"json": ["a", "list"]}, "not a JSON object"),
        (204, {}, "not JSON"),
    ],
    ids=["text", "binary", "html", "json-list", "no-content"],
)
async def test_a_success_that_is_not_a_json_object_is_a_service_error(
    status: int, answer: dict[str, Any], says: str
) -> None:
    """These used to raise JSONDecodeError, or AttributeError from a list."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, **answer))
    with (
        ClipClient("http://svc:8080", transport=transport) as client,
        pytest.raises(ClipServiceError) as caught,
    ):
        client.embed(b"x")
    _assert_unexpected(caught.value, says, status)
    async with AsyncClipClient("http://svc:8080", transport=transport) as aio:
        with pytest.raises(ClipServiceError) as caught:
            await aio.analyze(b"x")
    _assert_unexpected(caught.value, says, status)


_GARMENT = {"type": "t-shirt", "type_score": 0.5, "color": "blue", "colors": []}
_OUTFIT = {"top": _GARMENT, "bottom": _GARMENT}
_VECTOR = encode_embedding([0.6, 0.8])


@pytest.mark.parametrize(
    ("body", "call", "says"),
    [
        ({"embedding": 5}, lambda c: c.embed(b"x"), "a malformed 'embedding'"),
        ({"embedding": "not base64!"}, lambda c: c.embed(b"x"), "a malformed 'embedding'"),
        (
            {"embedding": _VECTOR, "dtype": "float64"},
            lambda c: c.embed(b"x"),
            "a malformed 'dtype'",
        ),
        (
            {"embeddings": [_VECTOR]},
            lambda c: c.embed_batch([b"x", b"y"]),
            "a malformed 'embeddings'",
        ),
        ({"embeddings": _VECTOR}, lambda c: c.embed_batch([b"x"]), "a malformed 'embeddings'"),
        (
            {"embeddings": [_VECTOR, encode_embedding([1.0, 0.0, 0.0])]},
            lambda c: c.embed_batch([b"x", b"y"]),
            "a malformed 'embeddings'",
        ),
        ({"similarity": "0.5"}, lambda c: c.similarity([1.0], [1.0]), "a malformed 'similarity'"),
        ({"similarity": None}, lambda c: c.similarity([1.0], [1.0]), "a malformed 'similarity'"),
        ({"matches": "abc"}, lambda c: c.search([[1.0]], [[1.0]]), "a malformed 'matches'"),
        (
            {"matches": [[{"index": 0}]]},
            lambda c: c.search([[1.0]], [[1.0]]),
            "a malformed 'matches'",
        ),
        ({"top": "shirt", "bottom": _GARMENT}, lambda c: c.analyze(b"x"), "a malformed 'top'"),
        ({"top": _GARMENT}, lambda c: c.analyze(b"x"), "no 'bottom' field"),
        (
            {**_OUTFIT, "embedding": None},
            lambda c: c.analyze(b"x", True),
            "a malformed 'embedding'",
        ),
        (
            {"embeddings": [_VECTOR], "boxes": [[0.5, 0, 8, 16]], "dim": 2},
            lambda c: c.embed_frame(b"x", [[0.5, 0, 8, 16]]),
            "a malformed 'boxes'",
        ),
        (
            {"embeddings": [_VECTOR], "boxes": [[0, 0, 8, 16]], "descriptors": None},
            lambda c: c.embed_frame(b"x", [[0, 0, 8, 16]], analyze=True),
            "a malformed 'descriptors'",
        ),
        ({"embeddings": [], "boxes": []}, lambda c: c.embed_frame(b"x", []), "no 'dim' field"),
    ],
)
def test_a_200_with_a_missing_or_malformed_field_names_that_field(
    body: dict[str, Any], call: Callable[[ClipClient], Any], says: str
) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    with (
        ClipClient("http://svc:8080", transport=transport) as client,
        pytest.raises(ClipServiceError) as caught,
    ):
        call(client)
    _assert_unexpected(caught.value, says)


def test_answers_in_the_services_shape_are_still_read() -> None:
    """The checks above against the shapes the service sends (mocked: every field)."""
    frame_answer = {
        "embeddings": [_VECTOR],
        "boxes": [[0, 0, 8, 16]],
        "dim": 2,
        "model": "m",
        "dtype": "float32",
        "descriptors": [_OUTFIT],
    }
    answers = {
        "/embed/frame": frame_answer,
        "/analyze": {**_OUTFIT, "embedding": None, "dtype": "float32"},
        "/similarity": {"matches": [[{"index": 0, "similarity": 1}]]},
    }
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, json=answers[request.url.path])
    )
    with ClipClient("http://svc", transport=transport) as client:
        frame = client.embed_frame(b"x", [[0, 0, 8, 16]], analyze=True)
        outfit = client.analyze(b"x")
        matches = client.search([[1.0]], [[1.0]])
    assert frame.embeddings.dtype == np.float32
    assert frame.embeddings.tolist() == [pytest.approx([0.6, 0.8])]
    assert frame.descriptors == [_OUTFIT]
    assert outfit == {**_OUTFIT, "embedding": None, "dtype": "float32"}
    assert matches == [[{"index": 0, "similarity": 1}]]


# --- PIL images in modes PNG cannot store ---------------------------------------------


def _image_in_mode(mode: str, size: tuple[int, int] = (7, 5)) -> Image.Image:
    """Random pixels in `mode` (floats finite, so that the pixels compare equal)."""
    rng = np.random.default_rng(len(mode))
    if mode == "F":
        return Image.fromarray(rng.random((size[1], size[0]), dtype=np.float32) * 300)
    raw = rng.integers(0, 256, len(Image.new(mode, size).tobytes()), dtype=np.uint8)
    return Image.frombytes(mode, size, raw.tobytes())


def _sent_image(image: Image.Image) -> Image.Image:
    """The file the client sends for `image`, as the service's Pillow opens it."""
    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.read())
        return httpx.Response(200, json={"embedding": _VECTOR})

    with ClipClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        client.embed(image)
    body = sent[0]
    start = body.index(b"\r\n\r\n") + 4  # the multipart part's headers end there
    end = body.rindex(b"\r\n--")
    decoded = Image.open(io.BytesIO(body[start:end]))
    decoded.load()
    return decoded


@pytest.mark.parametrize("mode", ["CMYK", "F", "LAB", "I", "I;16B", "PA", "RGBX"])
def test_pil_modes_png_cannot_store_are_sent_as_tiff_with_the_same_pixels(mode: str) -> None:
    """These used to raise a raw OSError "cannot write mode CMYK as PNG"."""
    image = _image_in_mode(mode)
    sent = _sent_image(image)
    assert sent.format == "TIFF"
    if mode == "RGBX":  # X is padding: TIFF drops it
        image = image.convert("RGB")
    # Big-endian 16-bit comes back in the machine's order: the same values.
    assert sent.mode == ("I;16" if mode == "I;16B" else image.mode)
    assert sent.size == image.size
    np.testing.assert_array_equal(np.asarray(sent), np.asarray(image))


@pytest.mark.parametrize(
    ("mode", "as_mode"),
    [("HSV", "RGB"), ("YCbCr", "RGB"), ("La", "LA"), ("RGBa", "RGBA"), ("I;16N", "I")],
)
def test_pil_modes_neither_png_nor_tiff_store_are_converted_first(mode: str, as_mode: str) -> None:
    image = _image_in_mode(mode)
    sent = _sent_image(image)
    expected = image.convert(as_mode)
    assert sent.mode == as_mode
    np.testing.assert_array_equal(np.asarray(sent), np.asarray(expected))


def test_a_cmyk_frame_of_a_camera_is_sent_compressed_within_the_body_limit() -> None:
    """A 4 Mpx CMYK frame is 16 MB of pixels; the service takes 10 MiB bodies."""
    height, width = 1520, 2688
    rows = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, axis=1)
    columns = np.linspace(255, 0, width, dtype=np.uint8)[None, :].repeat(height, axis=0)
    frame = Image.fromarray(np.stack([rows, columns, rows // 2], axis=-1)).convert("CMYK")
    sent = image_bytes(frame)
    assert len(sent) < 10 * 1024 * 1024 < width * height * 4
    decoded = Image.open(io.BytesIO(sent))
    assert decoded.mode == "CMYK"
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(frame))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "RGB", "RGBA", "I;16"])
def test_pil_modes_png_stores_are_still_sent_as_png(mode: str) -> None:
    image = _image_in_mode(mode)
    sent = _sent_image(image)
    assert (sent.format, sent.mode) == ("PNG", mode)
    np.testing.assert_array_equal(np.asarray(sent), np.asarray(image))


async def test_cmyk_16_bit_and_float_images_embed_as_the_service_reads_them(
    tiny_app: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    """Through the real service: a CMYK image embeds as its RGB conversion, a 16-bit or a
    0..1 float grey image as the 8-bit grey image it scales to."""
    app, _ = tiny_app
    rgb = Image.fromarray(_pixels(6))
    grey = _pixels(7)[..., 0]
    wide = Image.frombytes(
        "I;16B", (grey.shape[1], grey.shape[0]), (grey.astype(">u2") * 257).tobytes()
    )
    async with AsyncClipClient("http://test", transport=httpx.ASGITransport(app=app)) as aio:
        cmyk = await aio.embed(rgb.convert("CMYK"))
        from_rgb = await aio.embed(rgb.convert("CMYK").convert("RGB"))
        floats = await aio.embed(Image.fromarray(grey.astype(np.float32) / 255.0))
        sixteen = await aio.embed(wide)
        from_grey = await aio.embed(grey)
    np.testing.assert_allclose(cmyk, from_rgb, atol=1e-6)
    np.testing.assert_allclose(floats, from_grey, atol=1e-6)
    np.testing.assert_allclose(sixteen, from_grey, atol=1e-6)


# --- one image where a list is expected; iterables --------------------------------------


@pytest.mark.parametrize(
    "one",
    [
        "crop.jpg",
        Path("crop.jpg"),
        noise_jpeg(1),
        Image.new("RGB", (8, 16)),
        np.zeros((16, 8, 3), dtype=np.uint8),
    ],
    ids=["str", "path", "bytes", "pil", "array"],
)
async def test_embed_batch_of_one_image_not_in_a_list_is_refused_before_sending(
    one: Any,
) -> None:
    """A path used to be read as its characters (IsADirectoryError: '/'), an array as
    its rows."""

    def no_request(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing should be sent")

    transport = httpx.MockTransport(no_request)
    refused = r"embed_batch takes a list of images, got one \w+: pass \[image\]"
    with (
        ClipClient("http://svc", transport=transport) as client,
        pytest.raises(ValueError, match=refused),
    ):
        client.embed_batch(one)
    async with AsyncClipClient("http://svc", transport=transport) as aio:
        with pytest.raises(ValueError, match=refused):
            await aio.embed_batch(one)


def _batch_echo(request: httpx.Request) -> httpx.Response:
    """/embed/batch's answer: one embedding per image part sent."""
    count = request.read().count(b'name="images"')
    return httpx.Response(200, json={"embeddings": [_VECTOR] * count, "dim": 2})


async def test_embed_batch_takes_any_iterable_reading_it_once() -> None:
    """A generator used to raise TypeError: object of type 'generator' has no len()."""
    crops = [noise_jpeg(seed) for seed in (1, 2, 3)]
    with ClipClient("http://svc", transport=httpx.MockTransport(_batch_echo)) as client:
        from_generator = client.embed_batch(crop for crop in crops)
        from_tuple = client.embed_batch(tuple(crops))
        with pytest.raises(ValueError, match="at least one image"):
            client.embed_batch(crop for crop in [])
    async with AsyncClipClient("http://svc", transport=httpx.MockTransport(_batch_echo)) as aio:
        from_async = await aio.embed_batch(iter(crops))
    assert from_generator.shape == from_tuple.shape == from_async.shape == (3, 2)


def test_embed_frame_takes_boxes_from_a_generator() -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        sent.append(body.split(b'name="boxes"\r\n\r\n')[1].split(b"\r\n")[0].decode())
        answer = {"embeddings": [_VECTOR] * 2, "boxes": [[0, 0, 8, 16], [1, 1, 9, 17]]}
        return httpx.Response(200, json=answer)

    boxes = [(0, 0, 8, 16), (1, 1, 9, 17)]
    with ClipClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        result = client.embed_frame(noise_jpeg(1), (box for box in boxes))
    assert sent == ["[[0.0, 0.0, 8.0, 16.0], [1.0, 1.0, 9.0, 17.0]]"]
    assert result.embeddings.shape == (2, 2)


def _refuse_to_send(request: httpx.Request) -> httpx.Response:
    raise AssertionError("nothing should be sent")


def test_encoded_images_are_taken_as_any_bytes_like_or_binary_file(tmp_path: Path) -> None:
    crop = noise_jpeg(4)
    path = tmp_path / "crop.jpg"
    path.write_bytes(crop)
    buffer = io.BytesIO(b"header" + crop)
    buffer.seek(len(b"header"))  # read from where it stands, as file.read() does
    with path.open("rb") as opened:
        forms = [bytearray(crop), memoryview(crop), io.BytesIO(crop), opened, buffer]
        assert [image_bytes(form) for form in forms] == [crop] * len(forms)
    with path.open("r", encoding="latin-1") as text_mode, pytest.raises(TypeError, match="'rb'"):
        image_bytes(text_mode)


def test_a_batch_of_bytes_like_and_file_images_is_sent_part_by_part() -> None:
    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.read())
        return _batch_echo(request)

    crops = [noise_jpeg(seed) for seed in (5, 6, 7)]
    with ClipClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        forms = [bytearray(crops[0]), memoryview(crops[1]), io.BytesIO(crops[2])]
        result = client.embed_batch(forms)
        with pytest.raises(ValueError, match="takes a list of images, got one BytesIO"):
            client.embed_batch(io.BytesIO(crops[0]))
    assert result.shape == (3, 2)
    assert all(crop in sent[0] for crop in crops)


@pytest.mark.parametrize(
    ("bad", "error", "says"),
    [
        ("missing.jpg", FileNotFoundError, r"images\[2\]: .*No such file.*missing\.jpg"),
        (None, TypeError, r"images\[2\]: cannot send NoneType as an image"),
        (np.zeros((4, 4, 2), np.uint8), ValueError, r"images\[2\]: numpy images must be"),
    ],
)
async def test_an_unreadable_image_in_a_batch_is_named_by_its_index(
    tmp_path: Path, bad: Any, error: type[Exception], says: str
) -> None:
    images = [noise_jpeg(1), noise_jpeg(2), tmp_path / bad if isinstance(bad, str) else bad]
    transport = httpx.MockTransport(_refuse_to_send)
    with ClipClient("http://svc", transport=transport) as client, pytest.raises(error, match=says):
        client.embed_batch(images)
    async with AsyncClipClient("http://svc", transport=transport) as aio:
        with pytest.raises(error, match=says):
            await aio.embed_batch(images)


def test_a_single_image_error_keeps_its_own_message(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jpg"
    with (
        ClipClient("http://svc", transport=httpx.MockTransport(_refuse_to_send)) as client,
        pytest.raises(FileNotFoundError) as caught,
    ):
        client.embed(missing)
    assert str(caught.value).startswith("[Errno 2]")


@pytest.mark.parametrize("flag", ["false", "true", 0, 1, None])
async def test_flags_that_are_not_bools_are_refused_before_sending(flag: Any) -> None:
    """`include_embedding="false"` used to be truthy: it asked for the embedding."""
    transport = httpx.MockTransport(_refuse_to_send)
    with ClipClient("http://svc", transport=transport) as client:
        refused = f"include_embedding must be True or False, got {flag!r}"
        with pytest.raises(TypeError, match=refused):
            client.analyze(noise_jpeg(1), include_embedding=flag)
        with pytest.raises(TypeError, match=f"analyze must be True or False, got {flag!r}"):
            client.embed_frame(noise_jpeg(1), [[0, 0, 8, 16]], analyze=flag)
    async with AsyncClipClient("http://svc", transport=transport) as aio:
        with pytest.raises(TypeError, match="include_embedding must be True or False"):
            await aio.analyze(noise_jpeg(1), include_embedding=flag)


def test_a_numpy_bool_flag_is_a_bool() -> None:
    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.read())
        return httpx.Response(200, json={"top": {}, "bottom": {}, "embedding": _VECTOR})

    with ClipClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        client.analyze(noise_jpeg(1), include_embedding=np.bool_(True))
    assert b'name="include_embedding"\r\n\r\ntrue' in sent[0]


async def test_a_closed_client_says_it_is_closed() -> None:
    """It used to raise httpx's RuntimeError, which is not a ClipClientError."""
    transport = httpx.MockTransport(_refuse_to_send)
    client = ClipClient("http://svc", transport=transport)
    client.close()
    with pytest.raises(ClipClientError, match="client of http://svc is closed"):
        client.embed(noise_jpeg(1))
    with pytest.raises(ClipClientError, match="is closed"):
        client.wait_until_ready(timeout_s=1)
    async with AsyncClipClient("http://svc", transport=transport) as aio:
        pass
    with pytest.raises(ClipClientError, match="is closed"):
        await aio.embed(noise_jpeg(1))
    with pytest.raises(ClipClientError, match="is closed"):
        await aio.wait_until_ready(timeout_s=1)


def test_an_error_after_retries_says_how_many_attempts_were_made() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        status = 503 if request.url.path == "/similarity" else 400
        body = {"error": {"code": "overloaded", "message": "queue full"}}
        return httpx.Response(status, json=body, headers={"Retry-After": "0"})

    with ClipClient("http://svc", retries=2, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ClipServiceError) as retried:
            client.similarity([1.0, 0.0], [0.0, 1.0])
        with pytest.raises(ClipServiceError) as once:
            client.embed(noise_jpeg(1))
    assert len(calls) == 4
    assert retried.value.message == (
        "queue full (still 503 after 3 attempts; raise retries or max_retry_wait_s to wait longer)"
    )
    assert (retried.value.status, retried.value.code) == (503, "overloaded")
    assert once.value.message == "queue full"


def test_wait_until_ready_waits_through_a_proxy_with_no_service_behind_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docker's or kubectl's port forward accepts and closes while nothing listens
    behind it, and nginx answers 502/504: not ready yet, as a refusal is. Each used to
    end the wait at once."""
    waits: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    answers: list[Any] = [
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError(""),
        502,
        504,
        200,
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer == 200:
            return httpx.Response(200, json={"status": "ready"})
        return httpx.Response(answer, text="<html>bad gateway</html>")

    with ClipClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        client.wait_until_ready(timeout_s=60)
    assert answers == []
    assert waits == [0.5, 1.0, 2.0, 2.0]


def test_a_connection_closed_without_an_answer_is_sent_again_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A graceful restart closes idle keep-alive connections; one may close as a request
    goes out on it. The call is safe to repeat, once: a request dropped twice is not a
    race."""
    monkeypatch.setattr(client_module.time, "sleep", lambda seconds: None)
    calls: list[httpx.Request] = []

    def drops_first(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ReadError("")
        return httpx.Response(200, json={"embedding": _VECTOR})

    with ClipClient("http://svc", transport=httpx.MockTransport(drops_first)) as client:
        assert client.embed(b"x").tolist() == pytest.approx([0.6, 0.8])
    assert len(calls) == 2

    def always_drops(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    calls.clear()
    with (
        ClipClient("http://svc", transport=httpx.MockTransport(always_drops)) as client,
        pytest.raises(
            ClipConnectionError, match=r"closed the connection without an answer \(2 attempts\)"
        ),
    ):
        client.embed(b"x")
    assert len(calls) == 2


async def test_refused_calls_come_back_spread_out_not_in_one_wave(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """64 callers refused with Retry-After 1 all came back at the same instant and were
    refused again: each wait is now Retry-After stretched by up to as much again."""
    waits: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    spread = iter([0.0, 0.5, 0.99, 0.9])
    monkeypatch.setattr(client_module.random, "random", lambda: next(spread))

    def busy(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "overloaded", "message": "queue full"}}
        return httpx.Response(503, json=body, headers={"Retry-After": "2"})

    transport = httpx.MockTransport(busy)
    with (
        ClipClient("http://svc", retries=4, max_retry_wait_s=3.5, transport=transport) as client,
        pytest.raises(ClipServiceError, match="after 5 attempts"),
    ):
        client.embed(b"x")
    # Never sooner than Retry-After; never past max_retry_wait_s.
    assert waits == [2.0, 3.0, 3.5, 3.5]


def test_a_proxys_502_and_504_are_retried_as_503_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module.time, "sleep", lambda seconds: None)
    statuses = [502, 504, 200]

    def handler(request: httpx.Request) -> httpx.Response:
        status = statuses.pop(0)
        if status == 200:
            return httpx.Response(200, json={"embedding": _VECTOR})
        return httpx.Response(status, text="<html>gateway</html>")

    with ClipClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        assert client.embed(b"x").shape == (2,)
    assert statuses == []


def test_timeouts_name_the_client_pool_when_the_request_never_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """300 calls at once on the default 100 connections: those that waited timeout_s
    for a connection were reported as the service not answering."""

    pool, _ = _raising(httpx.PoolTimeout(""))
    with (
        ClipClient("http://svc", timeout_s=5, max_connections=40, transport=pool) as client,
        pytest.raises(ClipConnectionError) as caught,
    ):
        client.embed(b"x")
    assert caught.value.args[0] == (
        "the request to the CLIP service at http://svc was not sent: all 40 connections of "
        "this client stayed busy for 5 s. Make fewer calls at once, or raise max_connections "
        "or timeout_s."
    )
    read, _ = _raising(httpx.ReadTimeout(""))
    with (
        ClipClient("http://svc", timeout_s=5, transport=read) as client,
        pytest.raises(ClipConnectionError, match=r"ReadTimeout: timed out\. Check that"),
    ):
        client.embed(b"x")


async def test_no_timeout_at_all_is_taken_by_every_call() -> None:
    """timeout_s=None, httpx's way to wait as long as it takes, crashed wait_until_ready
    comparing None with a float."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ready":
            return httpx.Response(200, json={"status": "ready"})
        return httpx.Response(200, json={"embedding": _VECTOR})

    transport = httpx.MockTransport(handler)
    with ClipClient("http://svc", timeout_s=None, transport=transport) as client:
        client.wait_until_ready(timeout_s=5)
        assert client.embed(b"x").shape == (2,)
    async with AsyncClipClient("http://svc", timeout_s=None, transport=transport) as aio:
        await aio.wait_until_ready(timeout_s=5)


def test_an_async_client_used_in_a_second_event_loop_says_so() -> None:
    """Its pooled connections belong to the first loop; a second asyncio.run used to
    fail inside httpx with "Event loop is closed", not a ClipClientError."""
    aio = AsyncClipClient(
        "http://svc",
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"embedding": _VECTOR})),
    )
    assert asyncio.run(aio.embed(b"x")).shape == (2,)
    with pytest.raises(ClipClientError, match="first used in another event loop"):
        asyncio.run(aio.embed(b"x"))


def _raising(error: Exception) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport whose every request raises `error`, and the requests it was sent."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        raise error

    return httpx.MockTransport(handler), sent


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client's retry waits, recorded instead of slept, and not spread at random."""
    waits: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    monkeypatch.setattr(client_module.random, "random", lambda: 0.0)
    return waits


def test_timeout_s_bounds_a_whole_call_not_each_attempt(waits: list[float]) -> None:
    """timeout_s=60 with 3 retries could hold a call for 4 x 60 s plus 3 waits of up to
    30 s. Now a retry that would start past timeout_s is not made, and each attempt is
    given only what is left of it."""
    seen: list[dict[str, float]] = []

    def busy(retry_after: str) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request.extensions["timeout"])
            body = {"error": {"code": "overloaded", "message": "queue full"}}
            return httpx.Response(503, json=body, headers={"Retry-After": retry_after})

        return httpx.MockTransport(handler)

    # Retry-After 10 against 5 s: refused at once, without sleeping, saying which bound.
    with (
        ClipClient("http://svc", timeout_s=5, retries=3, transport=busy("10")) as client,
        pytest.raises(ClipServiceError) as caught,
    ):
        client.embed(b"x")
    assert waits == []
    assert len(seen) == 1
    assert caught.value.status == 503
    assert caught.value.message == (
        "queue full (still 503 after 1 attempt; the next would start past timeout_s, 5 s, "
        "which bounds the whole call: raise timeout_s to wait longer)"
    )
    # Each attempt's connect, write, read and pool wait at most what is left of 5 s.
    assert all(0 < limit <= 5 for limit in seen[0].values())

    # Within the bound, retries go on as before, and the last error says retries ran out.
    seen.clear()
    with (
        ClipClient("http://svc", timeout_s=5, retries=2, transport=busy("1")) as client,
        pytest.raises(ClipServiceError, match=r"after 3 attempts; raise retries"),
    ):
        client.embed(b"x")
    assert waits == [1.0, 1.0]
    assert len(seen) == 3


def test_refused_connections_are_not_retried_past_timeout_s(
    waits: list[float],
) -> None:
    transport, attempts = _raising(httpx.ConnectError("Connection refused"))
    # Backoffs of 0.5, 1 and 2 s: the first two fit in 2 s, the third does not.
    with (
        ClipClient("http://svc", timeout_s=2, retries=5, transport=transport) as client,
        pytest.raises(ClipConnectionError) as caught,
    ):
        client.embed(b"x")
    # The sleeps are faked, so the clock stands still: 0.5 and 1 each fit in 2 s; a
    # backoff of 2 would start the retry with no time left.
    assert waits == [0.5, 1.0]
    assert len(attempts) == 3
    assert (
        "(3 attempts; not tried again, as the retry would start past timeout_s, 2 s"
        in (caught.value.args[0])
    )
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


async def test_the_async_client_bounds_a_whole_call_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module.random, "random", lambda: 0.0)  # waits unspread
    seen: list[dict[str, float]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        body = {"error": {"code": "overloaded", "message": "queue full"}}
        return httpx.Response(503, json=body, headers={"Retry-After": "0.3"})

    transport = httpx.MockTransport(handler)
    started = time.monotonic()
    async with AsyncClipClient("http://svc", timeout_s=0.5, retries=10, transport=transport) as aio:
        with pytest.raises(ClipServiceError, match="after 2 attempts; the next would start past"):
            await aio.embed(b"x")
    elapsed = time.monotonic() - started
    # A real wait of 0.3 s, then a second attempt; a third would start at 0.6 s. Ten
    # retries would have taken 3 s.
    assert len(seen) == 2
    assert elapsed < 1.5
    # The second attempt had only what was left of the 0.5 s.
    assert all(limit <= 0.2 for limit in seen[1].values())


@pytest.mark.parametrize(
    ("setting", "error", "says"),
    [
        ({"timeout_s": "30"}, TypeError, "timeout_s must be a number of seconds or None, got '30'"),
        ({"timeout_s": True}, TypeError, "timeout_s must be a number of seconds"),
        ({"timeout_s": float("nan")}, ValueError, "timeout_s must be above 0 and at most 1000000"),
        ({"timeout_s": -1}, ValueError, "timeout_s must be above 0 and at most 1000000 seconds"),
        ({"timeout_s": 0}, ValueError, "timeout_s must be above 0 and at most 1000000 seconds (No"),
        # The socket layer takes no timeout of ~1e10 s: every sync call raised OverflowError.
        ({"timeout_s": 1e10}, ValueError, "timeout_s must be above 0 and at most 1000000"),
        ({"timeout_s": float("inf")}, ValueError, "timeout_s must be above 0 and at most"),
        ({"retries": -1}, ValueError, "retries must be at least 0, got -1"),
        ({"retries": 2.5}, TypeError, "retries must be a whole number, got 2.5"),
        ({"max_retry_wait_s": None}, TypeError, "max_retry_wait_s must be a number of seconds,"),
        ({"max_retry_wait_s": -0.5}, ValueError, "max_retry_wait_s must be at least 0 and at most"),
        # time.sleep overflowed on a Retry-After as long as this would allow.
        ({"max_retry_wait_s": 1e300}, ValueError, "max_retry_wait_s must be at least 0 and at"),
        ({"max_connections": 0}, ValueError, "max_connections must be at least 1, got 0"),
    ],
)
def test_settings_a_client_cannot_work_with_are_refused_when_it_is_made(
    setting: dict[str, Any], error: type[Exception], says: str
) -> None:
    """They surfaced on the first call, as httpx's own error (or, for a negative
    timeout, as every call timing out at once)."""
    for make in (ClipClient, AsyncClipClient):
        with pytest.raises(error) as caught:
            make("http://svc", **setting)
        assert caught.value.args[0].startswith(says)


def test_numpy_numbers_are_taken_as_settings() -> None:
    answer = httpx.Response(200, json={"embedding": _VECTOR})
    transport = httpx.MockTransport(lambda request: answer)
    with ClipClient(
        "http://svc",
        timeout_s=np.float32(5),
        retries=np.int64(2),
        max_connections=np.int64(4),
        transport=transport,
    ) as client:
        assert client.embed(b"x").shape == (2,)


def test_whole_seconds_and_no_retries_are_taken() -> None:
    calls: list[httpx.Request] = []

    def busy(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        body = {"error": {"code": "overloaded", "message": "queue full"}}
        return httpx.Response(503, json=body, headers={"Retry-After": "0"})

    transport = httpx.MockTransport(busy)
    with (
        ClipClient("http://svc", timeout_s=5, retries=0, transport=transport) as client,
        pytest.raises(ClipServiceError) as caught,
    ):
        client.embed(b"x")
    assert caught.value.message == "queue full"
    assert len(calls) == 1
    assert calls[0].extensions["timeout"]["read"] <= 5


def test_a_retry_after_in_other_digits_gets_the_usual_backoff(
    waits: list[float],
) -> None:
    """ "²" passed str.isdigit() and then failed float(): a ValueError out of a call."""
    answers = [(b"\xb2", 503), (b"Wed, 21 Oct 2026 07:28:00 GMT", 503), (b"0", 200)]

    def handler(request: httpx.Request) -> httpx.Response:
        retry_after, status = answers.pop(0)
        if status == 200:
            return httpx.Response(200, json={"embedding": _VECTOR})
        body = {"error": {"code": "overloaded", "message": "queue full"}}
        return httpx.Response(status, json=body, headers=[(b"Retry-After", retry_after)])

    with ClipClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        assert client.embed(b"x").shape == (2,)
    assert waits == [0.5, 1.0]  # the backoff of attempts 1 and 2


@pytest.mark.parametrize("status", [200, 503])
def test_answers_python_cannot_read_are_the_clients_errors(status: int) -> None:
    """A body of nested brackets deeper than Python's recursion limit raised
    RecursionError, and a body its Content-Encoding does not match httpx's
    DecodingError, out of the client: neither is a ClipClientError."""
    deep = httpx.MockTransport(lambda request: httpx.Response(status, content=b"[" * 100_000))
    with (
        ClipClient("http://svc", retries=0, transport=deep) as client,
        pytest.raises(ClipServiceError) as caught,
    ):
        client.embed(b"x")
    assert caught.value.status == status
    assert caught.value.code == ("unexpected_answer" if status == 200 else "http_error")

    def not_gzip(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status, content=b"plain, not gzip", headers={"Content-Encoding": "gzip"}
        )

    with (
        ClipClient("http://svc", retries=0, transport=httpx.MockTransport(not_gzip)) as client,
        pytest.raises(ClipConnectionError) as undecodable,
    ):
        client.embed(b"x")
    assert undecodable.value.args[0].startswith(
        "the answer from the CLIP service at http://svc could not be decoded: DecodingError:"
    )
    assert "a proxy" in undecodable.value.args[0]
    with (
        ClipClient("http://svc", transport=httpx.MockTransport(not_gzip)) as client,
        pytest.raises(ClipConnectionError, match="could not be decoded"),
    ):
        client.wait_until_ready(timeout_s=1)


def test_a_retry_needs_the_time_the_last_attempt_took(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 503 after 0.1 s, Retry-After 0.3, timeout_s 0.45: the retry would have started
    with 0.05 s left and timed out, reporting an overloaded service as not answering."""
    monkeypatch.setattr(client_module.random, "random", lambda: 0.0)
    calls: list[httpx.Request] = []

    def slow_refusal(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        time.sleep(0.1)
        body = {"error": {"code": "overloaded", "message": "queue full"}}
        return httpx.Response(503, json=body, headers={"Retry-After": "0.3"})

    transport = httpx.MockTransport(slow_refusal)
    with (
        ClipClient("http://svc", timeout_s=0.45, transport=transport) as client,
        pytest.raises(ClipServiceError, match=r"after 1 attempt; the next would start past"),
    ):
        client.embed(b"x")
    assert len(calls) == 1


async def test_the_async_client_bounds_an_answer_trickled_a_byte_at_a_time() -> None:
    """httpx times each read: 76 bytes at one a second held a call with timeout_s=3 for
    75 s. The async client now bounds the whole attempt."""

    async def trickle() -> Any:
        for byte in b'{"embedding": "AAAA"}':
            await asyncio.sleep(0.05)
            yield bytes([byte])

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=trickle()))
    started = time.monotonic()
    async with AsyncClipClient("http://svc", timeout_s=0.3, transport=transport) as aio:
        with pytest.raises(ClipConnectionError) as caught:
            await aio.embed(b"x")
    elapsed = time.monotonic() - started
    assert elapsed < 0.9  # the 21 bytes take 1.05 s
    assert "within 0.3 s: ReadTimeout: the answer was not complete" in caught.value.args[0]


def test_the_sync_client_bounds_an_answer_trickled_a_byte_at_a_time() -> None:
    def trickle() -> Any:
        for byte in b'{"embedding": "AAAA"}':
            time.sleep(0.05)
            yield bytes([byte])

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=trickle()))
    started = time.monotonic()
    with (
        ClipClient("http://svc", timeout_s=0.3, transport=transport) as client,
        pytest.raises(ClipConnectionError) as caught,
    ):
        client.embed(b"x")
    elapsed = time.monotonic() - started
    assert elapsed < 0.9  # the 21 bytes take 1.05 s
    assert "within 0.3 s: ReadTimeout: the answer was not complete" in caught.value.args[0]


def test_the_sync_client_ends_a_call_at_timeout_s_when_a_read_is_already_waiting() -> None:
    """Headers at once, a byte of the body just before the time is up, then nothing: the
    read that follows waited the attempt's whole timeout again (6.0 s for a call with
    timeout_s=3 against such a server). Every socket read now ends with the call."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        done = threading.Event()

        def stall() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n")
                time.sleep(0.8)
                connection.sendall(b'{"emb')
                done.wait(10)

        server = threading.Thread(target=stall, daemon=True)
        server.start()
        started = time.monotonic()
        try:
            with (
                ClipClient(url, timeout_s=1.0) as client,
                pytest.raises(ClipConnectionError) as caught,
            ):
                client.embed(b"x")
        finally:
            done.set()
            server.join(10)
    elapsed = time.monotonic() - started
    assert 0.95 < elapsed < 1.4  # before: ~1.8 s (0.8 s, then a read given 1 s)
    assert "within 1 s: ReadTimeout: the answer was not complete" in caught.value.args[0]


def test_a_deadline_does_not_follow_a_connection_back_to_the_pool() -> None:
    """The bound lives with the call, not with the socket: a kept-alive connection that
    served a call with little time left serves the next call, without one, in full."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        body = json.dumps({"embedding": encode_embedding(np.array([0.6, 0.8], np.float32))})
        answer = (
            f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n{body}"
        ).encode()
        accepted: list[int] = []

        def serve_two_on_one_connection() -> None:
            connection, _ = listener.accept()
            accepted.append(1)
            with connection:
                connection.recv(65536)
                connection.sendall(answer)
                connection.recv(65536)
                time.sleep(0.6)  # past the first call's deadline, within the second's
                connection.sendall(answer)

        server = threading.Thread(target=serve_two_on_one_connection, daemon=True)
        server.start()
        with ClipClient(url, timeout_s=0.5) as client:
            np.testing.assert_allclose(client.embed(b"x"), [0.6, 0.8], atol=1e-6)
            client._timeout = 5.0  # the next call, on the same kept-alive connection
            np.testing.assert_allclose(client.embed(b"x"), [0.6, 0.8], atol=1e-6)
        server.join(10)
    assert accepted == [1]


def test_the_sync_client_reads_a_gzipped_answer_in_chunks() -> None:
    """The chunked read (for the deadline) decodes the body as httpx's own read does."""
    body = gzip.compress(json.dumps({"embedding": _VECTOR}).encode())

    def gzipped(request: httpx.Request) -> httpx.Response:
        chunks = (body[i : i + 7] for i in range(0, len(body), 7))
        return httpx.Response(200, content=chunks, headers={"Content-Encoding": "gzip"})

    with ClipClient("http://svc", transport=httpx.MockTransport(gzipped)) as client:
        np.testing.assert_allclose(client.embed(b"x"), [0.6, 0.8], atol=1e-6)
    with ClipClient("http://svc", timeout_s=None, transport=httpx.MockTransport(gzipped)) as c:
        np.testing.assert_allclose(c.embed(b"x"), [0.6, 0.8], atol=1e-6)


@pytest.mark.parametrize(
    ("url", "api_key", "error", "says"),
    [
        (None, None, TypeError, "url must be a string such as 'http://host:8000', got None"),
        (8000, None, TypeError, "url must be a string such as 'http://host:8000', got 8000"),
        ("localhost:8000", None, ValueError, "url must start with http:// or https://"),
        ("http://[::1", None, ValueError, "url 'http://[::1' is not a valid URL"),
        ("http://svc", 123, TypeError, "api_key must be a string or None, got int"),
    ],
)
def test_an_address_or_key_it_cannot_use_is_refused_when_it_is_made(
    url: Any, api_key: Any, error: type[Exception], says: str
) -> None:
    """They raised AttributeError, httpx's InvalidURL or its TypeError, some only on the
    first call."""
    for make in (ClipClient, AsyncClipClient):
        with pytest.raises(error) as caught:
            make(url, api_key=api_key)
        assert caught.value.args[0].startswith(says)


def test_a_reply_that_is_not_http_is_named_so_and_not_sent_again() -> None:
    """httpx raises RemoteProtocolError both for a connection closed without an answer
    and for a reply that is not HTTP (another kind of server, TLS spoken to http://);
    the second was sent twice and reported as a service that "may have restarted"."""
    not_http = httpx.RemoteProtocolError("illegal status line: bytearray(b'hello there')")
    transport, calls = _raising(not_http)
    with (
        ClipClient("http://svc", transport=transport) as client,
        pytest.raises(ClipConnectionError) as caught,
    ):
        client.embed(b"x")
    assert len(calls) == 1
    assert caught.value.args[0].startswith(
        "the CLIP service at http://svc answered with something that is not HTTP: "
        "RemoteProtocolError: illegal status line"
    )
    assert "https://" in caught.value.args[0]
    started = time.monotonic()
    with (
        ClipClient("http://svc", transport=transport) as client,
        pytest.raises(ClipConnectionError, match="not HTTP"),
    ):
        client.wait_until_ready(timeout_s=30)
    assert time.monotonic() - started < 5  # no polling for 30 s


async def test_the_async_clients_errors_say_what_the_system_said() -> None:
    """Its transport's texts were "ConnectError: All connection attempts failed" and
    "ReadTimeout: no detail", where the sync client's name the refusal and the timeout."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening
        async with AsyncClipClient(refused_url, retries=0) as aio:
            with pytest.raises(ClipConnectionError) as refused:
                await aio.embed(b"x")
    assert "ConnectError: All connection attempts failed: [Errno 111]" in refused.value.args[0]
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        async with AsyncClipClient(silent_url, timeout_s=0.3) as aio:
            with pytest.raises(ClipConnectionError) as timed_out:
                await aio.embed(b"x")
    assert "within 0.3 s: ReadTimeout: " in timed_out.value.args[0]
    assert "no detail" not in timed_out.value.args[0]
