"""The bad-input corpus: each malformed input and the status it must get (never a 500)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from app.codec import encode_embedding
from tests.helpers import image_bytes


def encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 64), c) for c in ((200, 0, 0), (0, 0, 200))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40)
    return buffer.getvalue()


def palette_with_transparency() -> bytes:
    image = Image.new("P", (32, 64), 1)
    image.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    return encoded(image, "PNG", transparency=0)


JPEG = image_bytes((128, 256))
PNG = image_bytes((128, 256), fmt="PNG")

FILES: list[tuple[str, bytes, int]] = [
    ("not an image", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("empty", b"", 400),
    ("truncated JPEG", JPEG[: len(JPEG) // 2], 400),
    ("truncated PNG", PNG[: len(PNG) // 2], 400),
    ("decompression bomb", encoded(Image.new("1", (20_000, 20_000)), "PNG"), 413),
    ("1x1", image_bytes((1, 1), fmt="PNG"), 200),
    ("10000x2", image_bytes((10_000, 2), fmt="PNG"), 200),
    ("CMYK JPEG", encoded(Image.new("CMYK", (32, 64), (0, 200, 200, 0)), "JPEG"), 200),
    ("16-bit grey", encoded(Image.fromarray(np.full((64, 32), 40_000, np.uint16)), "PNG"), 200),
    ("palette with transparency", palette_with_transparency(), 200),
    ("animated GIF", animated_gif(), 200),
    # 40 Mpx in 411 kB and 201 kB: once 24 GB and 2 GB of padding (test_hostile_shapes
    # bounds their memory in a process of their own).
    ("40x1000000 PNG", image_bytes((40, 1_000_000), fmt="PNG"), 200),
    ("1000x40000 PNG", image_bytes((1000, 40_000), fmt="PNG"), 200),
]


@pytest.mark.parametrize(("name", "data", "status"), FILES, ids=[f[0] for f in FILES])
async def test_image_corpus(client: httpx.AsyncClient, name: str, data: bytes, status: int) -> None:
    for path in ("/embed", "/analyze"):
        response = await client.post(path, files={"image": ("x", data)})
        expected = 422 if path == "/analyze" and name in ("1x1", "10000x2") else status
        assert response.status_code == expected, (path, response.text)
        if expected != 200:
            assert set(response.json()["error"]) == {"code", "message"}
    batch = await client.post(
        "/embed/batch", files=[("images", ("ok", JPEG)), ("images", ("x", data))]
    )
    assert batch.status_code == status
    if status != 200:
        assert "images[1]" in batch.json()["error"]["message"]


VECTOR = encode_embedding([1.0, 0.0, 0.0, 0.0])
# The tiny model's 64 dims: of the wrong length, the length is what is refused first.
NAN = base64.b64encode(np.array([np.nan, 1] + [0] * 62, np.float32).tobytes()).decode()

REQUESTS: list[tuple[str, str, dict[str, object], int]] = [
    ("bad base64", "/embed", {"json": {"image": "not*base64"}}, 400),
    ("text/plain", "/embed", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
    ("image/jpeg body", "/embed", {"content": JPEG, "headers": {"content-type": "image/jpeg"}}, 415),
    ("form-urlencoded", "/embed", {"data": {"image": "x"}}, 415),
    ("xml to similarity", "/similarity", {"content": b"<a/>", "headers": {"content-type": "application/xml"}}, 415),
    ("huge JSON", "/embed", {"content": json.dumps({"image": "A" * 3_000_000}).encode(), "headers": {"content-type": "application/json"}}, 413),
    ("deep JSON", "/embed", {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}}, 400),
    ("deep JSON to similarity", "/similarity", {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}}, 400),
    ("NaN embedding", "/similarity", {"json": {"a": NAN, "b": VECTOR}}, 400),
    ("mismatched dims", "/similarity", {"json": {"a": VECTOR, "b": encode_embedding([1.0, 0.0])}}, 422),
    ("top_k 0", "/similarity", {"json": {"queries": [VECTOR], "gallery": [VECTOR], "top_k": 0}}, 422),
    ("null image", "/embed", {"json": {"image": None}}, 422),
    ("batch not a list", "/embed/batch", {"json": {"images": {"a": 1}}}, 422),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "path", "kwargs", "status"), REQUESTS, ids=[r[0] for r in REQUESTS]
)
async def test_request_corpus(
    client: httpx.AsyncClient, name: str, path: str, kwargs: dict[str, object], status: int
) -> None:
    response = await client.post(path, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"code", "message"}
