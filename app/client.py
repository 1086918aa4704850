"""A small client for the service: images in, numpy arrays out.

    from app.client import ClipClient
    with ClipClient("http://localhost:8000", api_key="...") as client:
        vector = client.embed("crop.jpg")                 # np.ndarray, float32, norm 1
        vectors = client.embed_batch([img1, img2])        # (2, 512)
        score = client.similarity(vector, vectors[0])
        outfit = client.analyze("crop.jpg")               # dict: top, bottom, embedding

`AsyncClipClient` has the same methods as coroutines. Images may be paths, bytes, PIL
images or numpy arrays (H, W, 3 uint8). 429/503 answers are retried after the server's
Retry-After; errors raise ClipServiceError with the server's error code.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image

from app.codec import decode_embedding, encode_embedding

ImageInput = str | os.PathLike[str] | bytes | Image.Image | npt.NDArray[np.uint8]
RETRIED_STATUSES = (429, 503)


class ClipServiceError(Exception):
    """An error answer from the service: HTTP status, the error code and its message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def image_bytes(image: ImageInput) -> bytes:
    """Any accepted image form to encoded file bytes (numpy and PIL become PNG)."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()
    raise TypeError(f"cannot send {type(image).__name__} as an image")


def _vector(embedding: npt.ArrayLike | str) -> str:
    return embedding if isinstance(embedding, str) else encode_embedding(np.asarray(embedding))


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200]
    raise ClipServiceError(response.status_code, code, message)


def _retry_delay(response: httpx.Response, attempt: int, cap_s: float) -> float:
    header = response.headers.get("Retry-After", "")
    delay = float(header) if header.replace(".", "", 1).isdigit() else 0.5 * 2**attempt
    return min(delay, cap_s)


class _Base:
    def __init__(
        self, url: str, api_key: str | None, timeout_s: float, retries: int, max_retry_wait_s: float
    ) -> None:
        self._url = url.rstrip("/")
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self._timeout = timeout_s
        self._retries = retries
        self._max_retry_wait_s = max_retry_wait_s

    @staticmethod
    def _files(field: str, images: Sequence[ImageInput]) -> list[tuple[str, tuple[str, bytes]]]:
        return [(field, (f"image{i}", image_bytes(image))) for i, image in enumerate(images)]


class ClipClient(_Base):
    """Synchronous client; use as a context manager or call close()."""

    def __init__(
        self,
        url: str = "http://localhost:8000",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        max_retry_wait_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout_s, retries, max_retry_wait_s)
        self._http = httpx.Client(
            base_url=self._url, headers=self._headers, timeout=timeout_s, transport=transport
        )

    def __enter__(self) -> ClipClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, **kwargs: Any) -> Any:
        for attempt in range(self._retries + 1):
            response = self._http.post(path, **kwargs)
            if response.status_code not in RETRIED_STATUSES or attempt == self._retries:
                break
            time.sleep(_retry_delay(response, attempt, self._max_retry_wait_s))
        _raise_for_error(response)
        return response.json()

    def embed(self, image: ImageInput, dtype: str = "float32") -> npt.NDArray[np.float32]:
        """`dtype="float16"` halves the bytes on the wire; the result is float32 either way."""
        body = self._post("/embed", files=self._files("image", [image]), params={"dtype": dtype})
        return decode_embedding(body["embedding"], body.get("dtype", "float32"))

    def embed_batch(
        self, images: Sequence[ImageInput], dtype: str = "float32"
    ) -> npt.NDArray[np.float32]:
        files = self._files("images", images)
        body = self._post("/embed/batch", files=files, params={"dtype": dtype})
        wire = body.get("dtype", "float32")
        return np.stack([decode_embedding(e, wire) for e in body["embeddings"]])

    def similarity(self, a: npt.ArrayLike | str, b: npt.ArrayLike | str) -> float:
        return float(
            self._post("/similarity", json={"a": _vector(a), "b": _vector(b)})["similarity"]
        )

    def search(
        self, queries: Sequence[npt.ArrayLike], gallery: Sequence[npt.ArrayLike], top_k: int = 5
    ) -> list[list[dict[str, Any]]]:
        body = {"queries": [_vector(q) for q in queries], "gallery": [_vector(g) for g in gallery]}
        return list(self._post("/similarity", json={**body, "top_k": top_k})["matches"])

    def analyze(self, image: ImageInput, include_embedding: bool = False) -> dict[str, Any]:
        data = {"include_embedding": "true" if include_embedding else "false"}
        body: dict[str, Any] = self._post(
            "/analyze", files=self._files("image", [image]), data=data
        )
        if body.get("embedding"):
            body["embedding"] = decode_embedding(body["embedding"])
        return body


class AsyncClipClient(_Base):
    """Asynchronous client; use with `async with` or await aclose()."""

    def __init__(
        self,
        url: str = "http://localhost:8000",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        max_retry_wait_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout_s, retries, max_retry_wait_s)
        self._http = httpx.AsyncClient(
            base_url=self._url, headers=self._headers, timeout=timeout_s, transport=transport
        )

    async def __aenter__(self) -> AsyncClipClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, **kwargs: Any) -> Any:
        for attempt in range(self._retries + 1):
            response = await self._http.post(path, **kwargs)
            if response.status_code not in RETRIED_STATUSES or attempt == self._retries:
                break
            await asyncio.sleep(_retry_delay(response, attempt, self._max_retry_wait_s))
        _raise_for_error(response)
        return response.json()

    async def embed(self, image: ImageInput, dtype: str = "float32") -> npt.NDArray[np.float32]:
        files = self._files("image", [image])
        body = await self._post("/embed", files=files, params={"dtype": dtype})
        return decode_embedding(body["embedding"], body.get("dtype", "float32"))

    async def embed_batch(
        self, images: Sequence[ImageInput], dtype: str = "float32"
    ) -> npt.NDArray[np.float32]:
        files = self._files("images", images)
        body = await self._post("/embed/batch", files=files, params={"dtype": dtype})
        wire = body.get("dtype", "float32")
        return np.stack([decode_embedding(e, wire) for e in body["embeddings"]])

    async def similarity(self, a: npt.ArrayLike | str, b: npt.ArrayLike | str) -> float:
        body = await self._post("/similarity", json={"a": _vector(a), "b": _vector(b)})
        return float(body["similarity"])

    async def search(
        self, queries: Sequence[npt.ArrayLike], gallery: Sequence[npt.ArrayLike], top_k: int = 5
    ) -> list[list[dict[str, Any]]]:
        body = {"queries": [_vector(q) for q in queries], "gallery": [_vector(g) for g in gallery]}
        return list((await self._post("/similarity", json={**body, "top_k": top_k}))["matches"])

    async def analyze(self, image: ImageInput, include_embedding: bool = False) -> dict[str, Any]:
        data = {"include_embedding": "true" if include_embedding else "false"}
        body: dict[str, Any] = await self._post(
            "/analyze", files=self._files("image", [image]), data=data
        )
        if body.get("embedding"):
            body["embedding"] = decode_embedding(body["embedding"])
        return body
