"""Fixtures: a tiny random open_clip model on disk, and apps built on it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.main import EncoderFactory, create_app
from app.tools.random_model import write_random_model


@pytest.fixture(scope="session", autouse=True)
def conversion_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of converted towers (OpenVINO IR, ONNX) for the whole run, never the
    user's own: set in the environment, so servers started by e2e tests share it."""
    folder = tmp_path_factory.mktemp("conversion-cache")
    os.environ["CLIP_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("tiny-clip"), arch="tiny", seed=1)


@pytest.fixture(scope="session")
def vit_b_32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full ViT-B-32 architecture with random weights: the real FLOPs and shapes."""
    return write_random_model(tmp_path_factory.mktemp("vit-b-32"), arch="ViT-B-32", seed=7)


@pytest.fixture(scope="session")
def tiny_settings(tiny_model_dir: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model": f"local-dir:{tiny_model_dir}",
            "device": "cpu",
            "precision": "fp32",
            # HTTP behaviour is what these apps test; test_precisions and test_backends
            # cover the other runtimes (and `auto`, which picks OpenVINO on CPUs).
            "backend": "torch",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@asynccontextmanager
async def serve(
    settings: Settings, encoder_factory: EncoderFactory | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan run, and an httpx client talking ASGI to it."""
    app = create_app(settings, encoder_factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client


@pytest.fixture(scope="session")
async def tiny_app(
    tiny_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with serve(tiny_settings(max_upload_bytes=2 * 1024 * 1024, max_batch_images=8)) as pair:
        yield pair


@pytest.fixture
def client(tiny_app: tuple[FastAPI, httpx.AsyncClient]) -> httpx.AsyncClient:
    return tiny_app[1]
