"""/metrics, request ids and the JSON access log."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

import httpx
import pytest

from app.config import Settings
from app.observability import JsonFormatter
from tests.conftest import serve
from tests.helpers import noise_jpeg


def sample(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{selector}}}" if labels else name) + r" ([0-9.e+-]+)"
    match = re.search(pattern, text)
    assert match, f"{name} {labels} not in metrics"
    return float(match.group(1))


async def test_metrics_count_requests_batches_and_rejections(
    tiny_settings: Callable[..., Settings],
) -> None:
    async with serve(tiny_settings(warmup=False)) as (_, client):
        for seed in range(3):
            await client.post("/embed", files={"image": ("c.jpg", noise_jpeg(seed))})
        await client.post("/embed", json={"image": "%%%"})
        await client.get("/no/such/path")
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert sample(text, "clip_requests_total", endpoint="/embed", status="200") == 3
    assert sample(text, "clip_requests_total", endpoint="/embed", status="400") == 1
    assert sample(text, "clip_requests_total", endpoint="other", status="404") == 1
    assert sample(text, "clip_rejections_total", reason="invalid_base64") == 1
    assert sample(text, "clip_batch_size_count") >= 1
    assert sample(text, "clip_batch_size_sum") == 3
    assert sample(text, "clip_queue_wait_seconds_count") == 3
    assert sample(text, "clip_forward_seconds_count") >= 1
    assert sample(text, "clip_request_duration_seconds_count", endpoint="/embed") == 4
    assert sample(text, "clip_queue_depth") == 0
    assert sample(text, "clip_images_in_flight") == 0  # every permit given back
    assert sample(text, "clip_pixels_in_flight") == 0


async def test_refusals_before_routing_count_under_their_endpoint(
    tiny_settings: Callable[..., Settings],
) -> None:
    """A 413 by Content-Length and a 415 by Content-Encoding or (for a body over the
    limit) Content-Type are decided before the router runs; they still belong to the
    endpoint that was called."""
    async with serve(tiny_settings(warmup=False, max_upload_bytes=1024)) as (_, client):
        await client.post(
            "/embed/batch", content=b"x" * 2000, headers={"content-type": "application/json"}
        )
        # Too large and of a type /analyze does not take: the type is what it is told.
        await client.post("/analyze", content=b"x" * 2000, headers={"content-type": "a/b"})
        await client.post(
            "/similarity",
            content=b"{}",
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
        await client.post("/no/such/path", content=b"x" * 2000)
        text = (await client.get("/metrics")).text
    assert sample(text, "clip_requests_total", endpoint="/embed/batch", status="413") == 1
    assert sample(text, "clip_requests_total", endpoint="/similarity", status="415") == 1
    assert sample(text, "clip_requests_total", endpoint="/analyze", status="415") == 1
    # A path with no endpoint is a 404 whatever the body's size (before: a 413).
    assert sample(text, "clip_requests_total", endpoint="other", status="404") == 1


async def test_request_ids_are_returned_and_logged(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.access")
    given = await client.get("/health", headers={"X-Request-ID": "camera-7.frame-42"})
    assert given.headers["x-request-id"] == "camera-7.frame-42"
    minted = await client.get("/health", headers={"X-Request-ID": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", minted.headers["x-request-id"])
    # Two ids: the last one was taken silently; a proxy may have logged the first.
    two = await client.get("/health", headers=[("X-Request-ID", "a-1"), ("X-Request-ID", "b-2")])
    assert re.fullmatch(r"[0-9a-f]{32}", two.headers["x-request-id"])
    error = await client.post("/embed", json={"image": "%%%"})
    assert re.fullmatch(r"[0-9a-f]{32}", error.headers["x-request-id"])
    records = [r for r in caplog.records if r.name == "app.access"]
    assert [getattr(r, "request_id", None) for r in records[-4:]] == [
        "camera-7.frame-42",
        minted.headers["x-request-id"],
        two.headers["x-request-id"],
        error.headers["x-request-id"],
    ]
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["status"] == 400
    assert line["endpoint"] == "/embed"
    assert line["method"] == "POST"
    assert line["duration_ms"] >= 0
