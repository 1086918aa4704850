"""Concurrent HTTP requests are served in shared forward passes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from app.codec import decode_embedding
from app.config import Settings
from app.inference.model import ClipImageEncoder
from tests.conftest import serve
from tests.helpers import noise_jpeg


class CountingEncoder:
    """The real tiny model, counting the forward passes and their sizes."""

    def __init__(self, inner: ClipImageEncoder) -> None:
        self.inner = inner
        self.batch_sizes: list[int] = []
        self.info = inner.info

    def preprocess(self, image: Image.Image) -> Any:
        return self.inner.preprocess(image)

    def encode(self, batch: Sequence[Any]) -> npt.NDArray[np.float32]:
        self.batch_sizes.append(len(batch))
        return self.inner.encode(batch)

    def warm_up(self) -> None:
        self.inner.warm_up()

    def __getattr__(self, name: str) -> Any:  # text tower and the rest: the real thing
        return getattr(self.inner, name)


W = TypeVar("W", bound=CountingEncoder)


def wrapping(kind: type[W], built: list[W]) -> Callable[[Settings, Sequence[str]], W]:
    """An encoder factory for create_app: the real tiny model inside `kind`, each one
    built also appended to `built` so the test can reach it."""

    def factory(settings: Settings, texts: Sequence[str] = ()) -> W:
        built.append(kind(ClipImageEncoder.load(settings, texts)))
        return built[-1]

    return factory


async def test_concurrent_requests_share_forward_passes(
    tiny_settings: Callable[..., Settings],
) -> None:
    encoders: list[CountingEncoder] = []
    # One stream: with two (torch's default on 2+ threads) the batcher splits what
    # waits between them, and this counts the passes of one.
    settings = tiny_settings(max_wait_ms=200, max_batch_size=16, warmup=False, forward_streams=1)
    crops = [noise_jpeg(seed) for seed in range(16)]
    async with serve(settings, wrapping(CountingEncoder, encoders)) as (_, client):
        singles = []
        for crop in crops[:3]:
            response = await client.post("/embed", files={"image": ("c.jpg", crop)})
            singles.append(decode_embedding(response.json()["embedding"]))
        encoders[0].batch_sizes.clear()
        responses = await asyncio.gather(
            *(client.post("/embed", files={"image": ("c.jpg", crop)}) for crop in crops)
        )
    assert all(r.status_code == 200 for r in responses)
    sizes = encoders[0].batch_sizes
    assert sum(sizes) == 16
    assert len(sizes) < 16, sizes
    assert max(sizes) > 1, sizes
    for single, response in zip(singles, responses, strict=False):
        np.testing.assert_allclose(
            decode_embedding(response.json()["embedding"]), single, atol=1e-5
        )


class FailingOnceEncoder(CountingEncoder):
    """Raises on its first forward pass after arming, like a CUDA OOM would."""

    armed = False

    def encode(self, batch: Sequence[Any]) -> npt.NDArray[np.float32]:
        if self.armed:
            self.armed = False
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (secret internals)")
        return super().encode(batch)


async def test_a_failed_forward_pass_fails_its_requests_and_the_next_succeed(
    tiny_settings: Callable[..., Settings],
) -> None:
    encoder: list[FailingOnceEncoder] = []
    factory = wrapping(FailingOnceEncoder, encoder)
    # One stream, so that the three requests meet in the pass that fails.
    async with serve(tiny_settings(max_wait_ms=100, forward_streams=1), factory) as (_, client):
        encoder[0].armed = True
        failed = await asyncio.gather(
            *(client.post("/embed", files={"image": ("c.jpg", noise_jpeg(i))}) for i in range(3))
        )
        for response in failed:
            assert response.status_code == 500
            assert response.json()["error"]["code"] == "inference_failed"
            assert "secret" not in response.text
            assert "CUDA" not in response.text
        after = await client.post("/embed", files={"image": ("c.jpg", noise_jpeg(9))})
        assert after.status_code == 200
        assert (await client.get("/ready")).status_code == 200


async def test_the_event_loop_never_runs_the_model(tiny_settings: Callable[..., Settings]) -> None:
    loop_thread = threading.get_ident()
    threads: set[int] = set()

    class ThreadRecorder(CountingEncoder):
        def preprocess(self, image: Image.Image) -> Any:
            threads.add(threading.get_ident())
            return super().preprocess(image)

        def encode(self, batch: Sequence[Any]) -> npt.NDArray[np.float32]:
            threads.add(threading.get_ident())
            return super().encode(batch)

    def factory(settings: Settings, texts: Sequence[str] = ()) -> ThreadRecorder:
        return ThreadRecorder(ClipImageEncoder.load(settings, texts))

    async with serve(tiny_settings(warmup=False), factory) as (_, client):
        response = await client.post("/embed/batch", files=[("images", ("a", noise_jpeg(1)))] * 3)
        assert response.status_code == 200
    assert threads
    assert loop_thread not in threads


@pytest.mark.parametrize("precision", ["bf16", "int8"])
async def test_other_cpu_precisions_serve_normalised_embeddings(
    tiny_settings: Callable[..., Settings], precision: str
) -> None:
    async with serve(tiny_settings(precision=precision)) as (_, client):
        info = (await client.get("/info")).json()
        response = await client.post("/embed", files={"image": ("c.jpg", noise_jpeg(3))})
    assert info["precision"] == precision
    vector = decode_embedding(response.json()["embedding"])
    assert np.isfinite(vector).all()
    assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-3)
