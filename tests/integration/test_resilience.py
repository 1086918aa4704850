"""Overload, a failing model, and clients that hang up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from fastapi import FastAPI

from app.config import Settings
from tests.conftest import serve
from tests.helpers import noise_jpeg
from tests.integration.test_batching import CountingEncoder, wrapping


class SlowEncoder(CountingEncoder):
    """The real tiny model, made slow (like a big model on a small CPU) and breakable."""

    delay_s = 0.05
    broken = False

    def encode(self, batch: Sequence[Any]) -> npt.NDArray[np.float32]:
        time.sleep(self.delay_s)
        if self.broken:
            raise RuntimeError("device lost")
        return super().encode(batch)


def slow_factory(holder: list[SlowEncoder]) -> Callable[[Settings], SlowEncoder]:
    return wrapping(SlowEncoder, holder)


async def test_overload_answers_every_request_fast_with_200_or_503(
    tiny_settings: Callable[..., Settings],
) -> None:
    holder: list[SlowEncoder] = []
    settings = tiny_settings(max_queue=4, max_batch_size=2, max_wait_ms=1, warmup=False)
    async with serve(settings, slow_factory(holder)) as (_, client):
        crop = noise_jpeg(1)
        responses = await asyncio.gather(
            *(client.post("/embed", files={"image": ("c.jpg", crop)}) for _ in range(60))
        )
        statuses = [r.status_code for r in responses]
        assert len(statuses) == 60  # every request got exactly one answer
        assert set(statuses) <= {200, 503}, set(statuses)
        assert statuses.count(200) >= 4
        assert statuses.count(503) >= 1
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.json()["error"]["code"] == "overloaded"
        assert int(refused.headers["Retry-After"]) >= 1
        assert (await client.get("/health")).status_code == 200
        after = await client.post("/embed", files={"image": ("c.jpg", crop)})
        assert after.status_code == 200


async def test_a_model_that_keeps_failing_turns_ready_off_and_back_on(
    tiny_settings: Callable[..., Settings],
) -> None:
    holder: list[SlowEncoder] = []
    async with serve(tiny_settings(warmup=False), slow_factory(holder)) as (_, client):
        encoder = holder[0]
        encoder.delay_s = 0.0
        assert (await client.get("/ready")).status_code == 200  # probe forward pass
        encoder.broken = True
        for seed in range(3):
            failed = await client.post("/embed", files={"image": ("c.jpg", noise_jpeg(seed))})
            assert failed.status_code == 500
            assert "device lost" not in failed.text
        ready = await client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "model_failing"
        assert (await client.get("/health")).status_code == 200
        encoder.broken = False
        assert (
            await client.post("/embed", files={"image": ("c.jpg", noise_jpeg(1))})
        ).status_code == 200
        assert (await client.get("/ready")).status_code == 200


async def test_requests_past_the_timeout_get_504(tiny_settings: Callable[..., Settings]) -> None:
    holder: list[SlowEncoder] = []
    settings = tiny_settings(request_timeout_s=0.2, warmup=False)
    async with serve(settings, slow_factory(holder)) as (_, client):
        holder[0].delay_s = 0.5
        response = await client.post("/embed", files={"image": ("c.jpg", noise_jpeg(1))})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"


async def test_a_client_that_hangs_up_costs_no_forward_pass(
    tiny_settings: Callable[..., Settings],
) -> None:
    """A raw ASGI call whose client disconnects right after sending the body."""
    holder: list[SlowEncoder] = []
    settings = tiny_settings(max_wait_ms=1, warmup=False)
    async with serve(settings, slow_factory(holder)) as (app, client):
        encoder = holder[0]
        encoder.delay_s = 0.3
        blocker = asyncio.create_task(
            client.post("/embed", files={"image": ("c.jpg", noise_jpeg(1))})
        )
        await asyncio.sleep(0.1)  # the blocker is in its forward pass now
        status = await post_and_hang_up(app, noise_jpeg(2))
        await blocker
        await asyncio.sleep(0.4)
    assert status is None  # nobody answered a client that is gone
    assert sum(encoder.batch_sizes) == 1  # only the blocker's image was computed


async def post_and_hang_up(app: FastAPI, crop: bytes) -> int | None:
    request = httpx.Request("POST", "http://test/embed", files={"image": ("c.jpg", crop)})
    body = request.read()
    sent_body = asyncio.Event()
    status: int | None = None

    async def receive() -> dict[str, Any]:
        if not sent_body.is_set():
            sent_body.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/embed",
        "raw_path": b"/embed",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    await app(scope, receive, send)
    return status if status != 499 else None
