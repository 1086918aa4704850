"""/embed images prepared in decode processes: the same answers as the threads give, the
same per-item errors, and a pool that survives a worker's death."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from collections.abc import AsyncIterator, Callable

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from app.codec import decode_embedding
from app.config import Settings
from app.inference.decode_workers import DecodeProcesses, default_decode_processes, split
from tests.conftest import serve
from tests.helpers import noise_jpeg


@pytest.fixture(scope="module")
async def process_app(
    tiny_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with serve(tiny_settings(decode_processes=2, max_batch_images=16)) as pair:
        yield pair


async def embeddings(client: httpx.AsyncClient, crops: list[bytes]) -> list[np.ndarray]:
    files = [("images", (f"{i}.jpg", crop, "image/jpeg")) for i, crop in enumerate(crops)]
    response = await client.post("/embed/batch", files=files)
    assert response.status_code == 200, response.text
    return [decode_embedding(item) for item in response.json()["embeddings"]]


async def test_processes_answer_what_the_threads_answer(
    process_app: tuple[FastAPI, httpx.AsyncClient], client: httpx.AsyncClient
) -> None:
    crops = [noise_jpeg(seed, size=(64 + 9 * seed, 150)) for seed in range(7)]
    ours = await embeddings(process_app[1], crops)
    threads = await embeddings(client, crops)
    assert len(ours) == len(crops)
    for mine, reference in zip(ours, threads, strict=True):
        np.testing.assert_allclose(mine, reference, atol=1e-6)
    single = await process_app[1].post("/embed", files={"image": ("c.jpg", crops[3])})
    np.testing.assert_allclose(decode_embedding(single.json()["embedding"]), ours[3], atol=1e-6)


async def test_info_says_how_many_processes_decode(
    process_app: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    info = (await process_app[1].get("/info")).json()
    assert info["batcher"]["decode_processes"] == 2


async def test_a_crop_that_fails_in_a_process_is_named(
    process_app: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    good = [noise_jpeg(seed) for seed in range(4)]
    truncated = noise_jpeg(9)[:1500]  # its header passes admission; its scan does not
    files = [
        ("images", (f"{i}.jpg", crop, "image/jpeg"))
        for i, crop in enumerate([good[0], good[1], truncated, good[2], truncated, good[3]])
    ]
    response = await process_app[1].post("/embed/batch", files=files)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith("images[2]")
    assert "also invalid: images[4]" in message


async def test_a_dead_worker_costs_a_retry_not_the_service(
    process_app: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = process_app
    processes = app.state.service._processes
    victim = next(iter(processes._pool._processes))
    os.kill(victim, signal.SIGKILL)
    crop = {"image": ("c.jpg", noise_jpeg(1), "image/jpeg")}
    statuses: list[int] = []
    deadline = time.monotonic() + 10
    # The pool learns of the death asynchronously: ask until it has, and after.
    while time.monotonic() < deadline and 503 not in statuses:
        response = await client.post("/embed", files=crop)
        statuses.append(response.status_code)
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "overloaded"
            assert response.headers["Retry-After"]
        else:
            await asyncio.sleep(0.05)
    assert statuses.count(503) == 1, statuses  # the request that met the broken pool
    after = await client.post("/embed", files=crop)
    assert after.status_code == 200  # a new pool serves
    assert victim not in processes._pool._processes


def test_processes_are_for_many_cores_and_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_decode_processes("cuda") == 8
    assert default_decode_processes("cuda:1") == 8
    assert default_decode_processes("cpu") == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert default_decode_processes("cuda") == 16
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert default_decode_processes("cuda") == 0


def test_shares_keep_order_and_balance() -> None:
    items = list(range(10))
    shares = split(items, 4)
    assert [len(share) for share in shares] == [3, 3, 2, 2]
    assert [item for share in shares for item in share] == items
    assert split(items[:2], 8) == [[0], [1]]


async def test_processes_that_cannot_start_leave_the_threads_decoding(
    tiny_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(self: DecodeProcesses) -> list[int]:
        raise OSError("no /dev/shm here")

    monkeypatch.setattr(DecodeProcesses, "start", refuse)
    async with serve(tiny_settings(decode_processes=2)) as (_, client):
        info = (await client.get("/info")).json()
        assert info["batcher"]["decode_processes"] == 0
        response = await client.post("/embed", files={"image": ("c.jpg", noise_jpeg(3))})
        assert response.status_code == 200


async def test_admission_reads_headers_before_the_processes_decode(
    process_app: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    """Over CLIP_MAX_IMAGE_PIXELS: 413 from the header alone, naming the item, and the
    pixel charge released afterwards."""
    app, client = process_app
    huge = io.BytesIO()
    Image.new("L", (7000, 6000)).save(huge, "PNG")  # 42 Mpx in a few kB
    files = [
        ("images", ("0.jpg", noise_jpeg(0), "image/jpeg")),
        ("images", ("1.png", huge.getvalue(), "image/png")),
    ]
    response = await client.post("/embed/batch", files=files)
    assert response.status_code == 413
    assert response.json()["error"]["message"].startswith("images[1]")
    assert app.state.service.admission.pixels_in_flight == 0
