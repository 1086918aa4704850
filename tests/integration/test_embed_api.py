"""/embed and /embed/batch through the ASGI app with a tiny real open_clip model."""

from __future__ import annotations

import base64
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from app.codec import decode_embedding
from app.config import Settings
from tests.conftest import serve
from tests.helpers import image_bytes, noise_jpeg


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def embed_json(client: httpx.AsyncClient, data: bytes) -> np.ndarray:
    response = await client.post("/embed", json={"image": b64(data)})
    assert response.status_code == 200, response.text
    return decode_embedding(response.json()["embedding"])


async def test_multipart_and_json_give_the_same_normalised_embedding(
    client: httpx.AsyncClient,
) -> None:
    crop = noise_jpeg(1)
    multipart = await client.post("/embed", files={"image": ("crop.jpg", crop, "image/jpeg")})
    assert multipart.status_code == 200, multipart.text
    body = multipart.json()
    vector = decode_embedding(body["embedding"])
    assert body["dim"] == vector.shape[0] == 64
    assert body["model"] == "local-dir:" + body["model"].split(":", 1)[1]
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(await embed_json(client, crop), vector, atol=1e-6)


@pytest.mark.parametrize(
    "prefix", ["data:image/jpeg;base64,", "data:;base64,", " data:image/jpeg;name=c.jpg;base64,"]
)
async def test_a_data_url_is_accepted(client: httpx.AsyncClient, prefix: str) -> None:
    crop = noise_jpeg(2)
    response = await client.post("/embed", json={"image": prefix + b64(crop)})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        decode_embedding(response.json()["embedding"]), await embed_json(client, crop), atol=1e-6
    )


async def test_batch_keeps_input_order_and_matches_single_requests(
    client: httpx.AsyncClient,
) -> None:
    crops = [noise_jpeg(seed) for seed in range(5)]
    singles = [await embed_json(client, crop) for crop in crops]
    as_json = await client.post("/embed/batch", json={"images": [b64(c) for c in crops]})
    as_files = await client.post(
        "/embed/batch",
        files=[("images", (f"{i}.jpg", c, "image/jpeg")) for i, c in enumerate(crops)],
    )
    for response in (as_json, as_files):
        assert response.status_code == 200, response.text
        vectors = [decode_embedding(e) for e in response.json()["embeddings"]]
        assert len(vectors) == 5
        for single, batched in zip(singles, vectors, strict=True):
            np.testing.assert_allclose(batched, single, atol=1e-5)
    # different pictures, different embeddings: order mix-ups would not go unseen
    assert float(singles[0] @ singles[1]) < 0.9999


async def test_every_format_is_embedded(client: httpx.AsyncClient) -> None:
    for fmt in ("PNG", "WEBP", "BMP", "GIF", "TIFF"):
        response = await client.post("/embed", files={"image": ("x", image_bytes(fmt=fmt))})
        assert response.status_code == 200, (fmt, response.text)


async def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    return str(body["error"]["code"]) + ": " + str(body["error"]["message"])


@pytest.mark.parametrize(
    ("kwargs", "status", "expected"),
    [
        ({"json": {"image": "%%%not base64"}}, 400, "invalid_base64"),
        ({"json": {"image": b64(b"plain text, not a picture")}}, 400, "invalid_image"),
        ({"json": {"image": b64(image_bytes()[:200])}}, 400, "truncated"),
        ({"json": {"image": ""}}, 400, "empty"),
        ({"files": {"image": ("e.jpg", b"")}}, 400, "empty"),
        ({"json": {}}, 422, "image: Field required"),
        ({"json": {"image": 5}}, 422, "image"),
        ({"json": {"image": b64(image_bytes()), "extra": 1}}, 422, "extra"),
        ({"json": ["image"]}, 422, "validation_error"),
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
        ),
        (
            {"content": image_bytes(), "headers": {"content-type": "image/jpeg"}},
            415,
            "multipart/form-data",
        ),
        ({"content": b"x"}, 415, "content type none"),
        ({"files": {"picture": ("a.jpg", image_bytes())}}, 422, "unexpected field(s) picture"),
        ({"data": {"image": "abc"}, "files": {"other": ("a", b"1")}}, 422, "unexpected"),
        (
            {"files": [("image", ("a.jpg", image_bytes())), ("image", ("b.jpg", image_bytes()))]},
            422,
            "/embed/batch",
        ),
    ],
)
async def test_bad_embed_requests_get_a_clear_json_error(
    client: httpx.AsyncClient, kwargs: dict[str, object], status: int, expected: str
) -> None:
    text = await error_of(await client.post("/embed", **kwargs), status)  # type: ignore[arg-type]
    assert expected in text


async def test_a_part_without_a_filename_is_read_as_the_image(client: httpx.AsyncClient) -> None:
    """RFC 7578 makes the filename optional, and a client generated from the schema
    leaves it out unless told."""
    for crop in (noise_jpeg(3), image_bytes(fmt="PNG")):
        bare = await client.post("/embed", files={"image": (None, crop, "image/jpeg")})
        named = await client.post("/embed", files={"image": ("c.jpg", crop)})
        assert bare.status_code == 200, bare.text
        assert bare.json()["embedding"] == named.json()["embedding"]
    batch = await client.post("/embed/batch", files=[("images", (None, noise_jpeg(3)))])
    assert batch.status_code == 200, batch.text
    response = await client.post("/embed", files={"image": (None, b"hello")})
    assert "not a decodable image" in await error_of(response, 400)
    # curl -F "image=$(base64 -w0 crop.jpg)": the base64 as a plain field, not the file.
    text = await client.post("/embed", files={"image": (None, base64.b64encode(noise_jpeg(3)))})
    assert "it is base64 text" in await error_of(text, 400)


async def test_a_bad_crop_in_a_batch_fails_the_request_naming_the_item(
    client: httpx.AsyncClient,
) -> None:
    crops = [b64(noise_jpeg(0)), b64(noise_jpeg(1)), b64(b"GIF89a broken"), b64(noise_jpeg(2))]
    text = await error_of(await client.post("/embed/batch", json={"images": crops}), 400)
    assert "images[2]" in text
    assert "images[0]" not in text
    # ...and nothing else: the service goes on serving
    assert (await client.post("/embed", json={"image": crops[0]})).status_code == 200


async def test_crops_that_fail_while_decoding_are_all_named_in_order(
    client: httpx.AsyncClient,
) -> None:
    """Headers pass, pixels don't: the failures surface from the decode threads, whichever
    share of the batch each one was decoded in."""
    good = [noise_jpeg(seed) for seed in range(6)]
    truncated = noise_jpeg(9)[:1500]  # a whole header, half the scan
    crops = [b64(c) for c in (*good[:1], truncated, *good[1:4], truncated, *good[4:])]
    text = await error_of(await client.post("/embed/batch", json={"images": crops}), 400)
    assert "images[1]" in text
    assert "also invalid: images[5]" in text
    assert "images[0]" not in text


async def test_a_full_batch_of_parts_without_filenames_is_read(
    tiny_settings: Callable[..., Settings],
) -> None:
    """Starlette counts a part without a filename as a text field, and capped fields at
    8 of them: a larger batch from a generated client got a 400 "Too many fields"."""
    crops = [noise_jpeg(i) for i in range(12)]
    async with serve(tiny_settings(max_batch_images=12, warmup=False)) as (_, client):
        bare = await client.post("/embed/batch", files=[("images", (None, c)) for c in crops])
        named = await client.post(
            "/embed/batch", files=[("images", (f"{i}.jpg", c)) for i, c in enumerate(crops)]
        )
        assert bare.status_code == named.status_code == 200, bare.text
        assert bare.json()["embeddings"] == named.json()["embeddings"]
        over = [("images", (None, c)) for c in [*crops, noise_jpeg(12)]]
        text = await error_of(await client.post("/embed/batch", files=over), 413)
        assert "CLIP_MAX_BATCH_IMAGES" in text


async def test_a_flood_of_form_fields_is_told_what_the_endpoint_takes(
    client: httpx.AsyncClient,
) -> None:
    fields = {f"note{i}": "x" for i in range(10_000)}
    response = await client.post("/analyze", files={"image": ("c.jpg", noise_jpeg(1))}, data=fields)
    text = await error_of(response, 413)
    assert "`image`, `include_embedding`" in text
    assert "boundary" not in text


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"images": []}, 422, "images"),
        ({"images": [b64(noise_jpeg(0))] * 9}, 413, "limit of 8"),
        ({"images": "not a list"}, 422, "images"),
    ],
)
async def test_batch_size_rules(
    client: httpx.AsyncClient, body: dict[str, object], status: int, expected: str
) -> None:
    assert expected in await error_of(await client.post("/embed/batch", json=body), status)


async def test_too_many_files_in_a_multipart_batch_is_413(client: httpx.AsyncClient) -> None:
    files = [("images", (f"{i}.jpg", noise_jpeg(i))) for i in range(9)]
    text = await error_of(await client.post("/embed/batch", files=files), 413)
    assert "CLIP_MAX_BATCH_IMAGES" in text


async def test_bodies_over_the_upload_limit_are_413(client: httpx.AsyncClient) -> None:
    big = b"\xff" * (3 * 1024 * 1024)
    text = await error_of(await client.post("/embed", files={"image": ("big.jpg", big)}), 413)
    assert "CLIP_MAX_UPLOAD_BYTES" in text

    async def chunks():  # no Content-Length: the running count must catch it
        for _ in range(40):
            yield b"a" * 100_000

    response = await client.post(
        "/embed", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "CLIP_MAX_UPLOAD_BYTES" in await error_of(response, 413)


async def test_a_large_body_to_no_endpoint_is_404_or_405_not_413(
    client: httpx.AsyncClient,
) -> None:
    """It was 413 "over CLIP_MAX_UPLOAD_BYTES": a client would shrink an upload that was
    never going anywhere, then get the 404. Decided before the body, as the 413 was."""
    big = b"\xff" * (3 * 1024 * 1024)
    for path in ("/embeds", "/embed/batch/"):
        response = await client.post(path, files={"image": ("big.jpg", big)})
        assert response.status_code == 404, response.text
        assert "no endpoint at" in response.json()["error"]["message"]
    # A method the endpoint does not take: the 405 that says so, as for a small body.
    wrong_method = await client.post("/health", files={"image": ("big.jpg", big)})
    assert wrong_method.status_code == 405, wrong_method.text
    # A body sent too large to an endpoint is still refused before it is read.
    assert "CLIP_MAX_UPLOAD_BYTES" in await error_of(
        await client.post("/embed", files={"image": ("big.jpg", big)}), 413
    )


@pytest.mark.parametrize(
    ("path", "content_type", "send"),
    [
        ("/embed", "text/plain", "multipart/form-data with file field `image`"),
        ("/embed/batch", "image/jpeg", "file field `images`"),
        ("/embed/frame", "text/csv", "and field `boxes` (and optionally `analyze`)"),
        ("/analyze", None, "file field `image` (and optionally `include_embedding`)"),
        ("/similarity", "multipart/form-data; boundary=x", "send application/json"),
    ],
)
async def test_a_large_body_of_a_type_the_endpoint_does_not_take_is_415_not_413(
    client: httpx.AsyncClient, path: str, content_type: str | None, send: str
) -> None:
    """It was 413: shrunk, the body got the 415 next. The type is decided before the
    body, as the size was, and in the words a small body of that type gets."""
    headers = {} if content_type is None else {"content-type": content_type}
    small = await error_of(await client.post(path, content=b"x", headers=headers), 415)
    large = await client.post(path, content=b"x" * (3 * 1024 * 1024), headers=headers)
    assert await error_of(large, 415) == small
    assert send in small
    # A type the endpoint takes keeps its 413.
    json_large = await client.post(
        path, content=b"x" * (3 * 1024 * 1024), headers={"content-type": "application/json"}
    )
    assert "CLIP_MAX_UPLOAD_BYTES" in await error_of(json_large, 413)
    # Two types: the 400 a small body gets (proxies differ on which copy counts).
    two = [("content-type", "application/json"), ("content-type", "text/plain")]
    small_two = await error_of(await client.post(path, content=b"{}", headers=two), 400)
    large_two = await client.post(path, content=b"x" * (3 * 1024 * 1024), headers=two)
    assert await error_of(large_two, 400) == small_two
    assert "2 Content-Type headers" in small_two


async def test_images_over_the_pixel_limit_are_413(client: httpx.AsyncClient) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buffer, "PNG")  # 48 MP, tiny file
    response = await client.post("/embed", files={"image": ("bomb.png", buffer.getvalue())})
    assert "CLIP_MAX_IMAGE_PIXELS" in await error_of(response, 413)


async def test_extreme_shapes_are_embedded_not_crashed(client: httpx.AsyncClient) -> None:
    for size in ((1, 1), (10_000, 2), (2, 10_000)):
        response = await client.post(
            "/embed", files={"image": ("s.png", image_bytes(size, fmt="PNG"))}
        )
        assert response.status_code == 200, (size, response.text)


async def test_wrong_methods_and_paths_are_json_too(client: httpx.AsyncClient) -> None:
    assert "not_found" in await error_of(await client.get("/nope"), 404)
    assert "method_not_allowed" in await error_of(await client.get("/embed"), 405)


@pytest.mark.parametrize("path", ["/embed", "/embed/batch", "/embed/frame", "/similarity"])
async def test_a_content_type_sent_twice_is_refused_naming_both(
    client: httpx.AsyncClient, path: str
) -> None:
    """Which copy counts differs between servers and proxies: a body read as one type
    here may have been checked as the other on its way."""
    headers = [
        ("content-type", "application/json"),
        ("content-type", "multipart/form-data; boundary=x"),
    ]
    response = await client.post(path, content=b"{}", headers=headers)
    text = await error_of(response, 400)
    assert response.json()["error"]["code"] == "invalid_http"
    assert "2 Content-Type headers" in text
    assert "application/json" in text
    assert "multipart/form-data" in text
