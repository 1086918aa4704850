"""/analyze through the ASGI app with the tiny real model."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from app.analysis.garments import Vocabulary, VocabularyError
from app.codec import decode_embedding
from app.config import Settings
from app.main import create_app
from app.tools.synthetic_people import make_person
from tests.conftest import serve
from tests.helpers import image_bytes, noise_jpeg
from tests.integration.test_batching import CountingEncoder, wrapping

VOCABULARY = Vocabulary.load()


def check_garment(garment: dict[str, object], labels: dict[str, list[str]]) -> None:
    assert garment["type"] in labels
    assert 0.0 < float(garment["type_score"]) <= 1.0  # type: ignore[arg-type]
    colors = garment["colors"]
    assert isinstance(colors, list)
    assert colors
    assert garment["color"] == colors[0]["name"]
    fractions = [c["fraction"] for c in colors]
    assert fractions == sorted(fractions, reverse=True)
    assert sum(fractions) <= 1.0 + 1e-6
    assert all(c["rgb"].startswith("#") and len(c["rgb"]) == 7 for c in colors)


async def test_analyze_describes_top_and_bottom(client: httpx.AsyncClient) -> None:
    person = make_person(np.random.default_rng(5))
    response = await client.post("/analyze", files={"image": ("p.jpg", person.jpeg)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"top", "bottom", "embedding", "dtype"}
    check_garment(body["top"], VOCABULARY.top)
    check_garment(body["bottom"], VOCABULARY.bottom)
    assert body["top"]["color"] == person.top
    assert body["bottom"]["color"] == person.bottom
    assert body["embedding"] is None


async def test_the_same_image_gives_the_same_descriptor(client: httpx.AsyncClient) -> None:
    crop = make_person(np.random.default_rng(6)).jpeg
    body = {"image": base64.b64encode(crop).decode()}
    first = (await client.post("/analyze", json=body)).json()
    second = (await client.post("/analyze", json=body)).json()
    assert first == second


async def test_include_embedding_returns_the_embed_result(client: httpx.AsyncClient) -> None:
    crop = noise_jpeg(4)
    analyzed = await client.post(
        "/analyze", files={"image": ("p.jpg", crop)}, data={"include_embedding": "true"}
    )
    embedded = await client.post("/embed", files={"image": ("p.jpg", crop)})
    assert analyzed.status_code == 200, analyzed.text
    np.testing.assert_allclose(
        decode_embedding(analyzed.json()["embedding"]),
        decode_embedding(embedded.json()["embedding"]),
        atol=1e-5,
    )
    as_json = await client.post(
        "/analyze", json={"image": base64.b64encode(crop).decode(), "include_embedding": True}
    )
    assert as_json.json()["embedding"] == analyzed.json()["embedding"]


async def test_a_real_photograph_goes_through(client: httpx.AsyncClient) -> None:
    buffer = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buffer, "JPEG")
    response = await client.post("/analyze", files={"image": ("astronaut.jpg", buffer.getvalue())})
    assert response.status_code == 200, response.text
    check_garment(response.json()["top"], VOCABULARY.top)
    check_garment(response.json()["bottom"], VOCABULARY.bottom)


@pytest.mark.parametrize(
    ("kwargs", "status", "expected"),
    [
        ({"json": {"image": "***"}}, 400, "invalid_base64"),
        ({"files": {"image": ("x.jpg", b"not an image")}}, 400, "invalid_image"),
        ({"files": {"image": ("x.png", image_bytes((4, 8), fmt="PNG"))}}, 422, "at least 8x16"),
        ({"files": {"image": ("x.png", image_bytes((1, 1), fmt="PNG"))}}, 422, "at least"),
        (
            {"files": {"image": ("x.jpg", image_bytes())}, "data": {"include_embedding": "maybe"}},
            422,
            "include_embedding",
        ),
        ({"json": {"image": "AAAA", "include_embedding": "perhaps"}}, 422, "include_embedding"),
        (
            {"files": {"image": ("x.jpg", image_bytes())}, "data": {"include_embedding": ""}},
            422,
            "`include_embedding` is empty",
        ),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
        ({"json": {}}, 422, "image"),
    ],
)
async def test_bad_analyze_requests(
    client: httpx.AsyncClient, kwargs: dict[str, object], status: int, expected: str
) -> None:
    response = await client.post("/analyze", **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    assert expected in json.dumps(response.json())


async def test_wide_crops_still_get_an_answer(client: httpx.AsyncClient) -> None:
    for size in ((400, 16), (16, 2000), (8, 16)):
        response = await client.post(
            "/analyze", files={"image": ("w.png", image_bytes(size, fmt="PNG"))}
        )
        assert response.status_code == 200, (size, response.text)


async def test_region_crops_share_forward_passes_with_embed_traffic(
    tiny_settings: Callable[..., Settings],
) -> None:
    encoders: list[CountingEncoder] = []
    factory = wrapping(CountingEncoder, encoders)
    # One stream: with two (torch's default on 2+ threads) four items go two to a pass.
    settings = tiny_settings(max_wait_ms=300, warmup=False, forward_streams=1)
    async with serve(settings, factory) as (_, client):
        encoders[0].batch_sizes.clear()
        responses = await asyncio.gather(
            client.post(
                "/analyze", files={"image": ("a.jpg", make_person(np.random.default_rng(1)).jpeg)}
            ),
            client.post("/embed", files={"image": ("b.jpg", noise_jpeg(1))}),
            client.post("/embed", files={"image": ("c.jpg", noise_jpeg(2))}),
        )
    assert [r.status_code for r in responses] == [200, 200, 200]
    sizes = encoders[0].batch_sizes
    assert sum(sizes) == 4  # two region crops + two embeds
    assert max(sizes) >= 3, sizes  # regions and other requests in one forward pass


async def test_a_custom_vocabulary_is_used(
    tiny_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(
        json.dumps(
            {
                "templates": ["a photo of a person wearing {}."],
                "top": {"vest": ["a vest"], "poncho": ["a poncho"]},
                "bottom": {"kilt": ["a kilt"], "sarong": ["a sarong"]},
            }
        )
    )
    async with serve(tiny_settings(garment_vocab=str(path))) as (_, client):
        body = (await client.post("/analyze", files={"image": ("p.jpg", noise_jpeg(3))})).json()
    assert body["top"]["type"] in {"vest", "poncho"}
    assert body["bottom"]["type"] in {"kilt", "sarong"}


async def test_a_bad_vocabulary_stops_startup(tiny_settings: Callable[..., Settings]) -> None:
    app = create_app(tiny_settings(garment_vocab="/no/such/vocab.json"))
    with pytest.raises(VocabularyError, match="CLIP_GARMENT_VOCAB"):
        async with app.router.lifespan_context(app):
            pass


async def test_openapi_documents_analyze(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"]["/analyze"]["post"]
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "include_embedding"} <= set(form["properties"])
    garment = schema["components"]["schemas"]["Garment"]
    assert {"type", "type_score", "color", "colors"} <= set(garment["properties"])
