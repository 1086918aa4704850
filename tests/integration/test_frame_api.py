"""/embed/frame through the ASGI app with the tiny real model: each box's embedding is
what /embed gives for the same pixels cut out by the client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from app.codec import decode_embedding
from app.config import Settings
from app.inference.projection import fit_pca
from app.tools.synthetic_people import make_person
from tests.conftest import serve
from tests.helpers import cosine
from tests.integration.test_batching import CountingEncoder, wrapping

FRAME_SIZE = (320, 240)


def frame_image(seed: int = 3, size: tuple[int, int] = FRAME_SIZE) -> Image.Image:
    """A frame with structure everywhere, so any misplaced crop shows in its embedding."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.Resampling.BILINEAR)


def encoded(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


async def post_frame(
    client: httpx.AsyncClient,
    frame: bytes,
    boxes: Any,
    analyze: bool | None = None,
    params: dict[str, str] | None = None,
) -> httpx.Response:
    data = {"boxes": boxes if isinstance(boxes, str) else json.dumps(boxes)}
    if analyze is not None:
        data["analyze"] = "true" if analyze else "false"
    return await client.post(
        "/embed/frame", files={"image": ("frame.png", frame)}, data=data, params=params
    )


async def embed_crop(client: httpx.AsyncClient, crop: Image.Image) -> npt.NDArray[np.float32]:
    response = await client.post("/embed", files={"image": ("crop.png", encoded(crop))})
    assert response.status_code == 200, response.text
    return decode_embedding(response.json()["embedding"])


def rows(body: dict[str, Any]) -> list[npt.NDArray[np.float32]]:
    return [decode_embedding(e, body["dtype"]) for e in body["embeddings"]]


async def assert_parity(
    client: httpx.AsyncClient, frame: Image.Image, boxes: Sequence[Sequence[float]]
) -> dict[str, Any]:
    response = await post_frame(client, encoded(frame), boxes)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["embeddings"]) == len(body["boxes"]) == len(boxes)
    for used, served in zip(body["boxes"], rows(body), strict=True):
        expected = await embed_crop(client, frame.crop(tuple(used)))
        assert served.shape == (body["dim"],)
        assert cosine(served, expected) >= 0.99999
    return body


BOXES = [[10, 20, 74, 180], [100.4, 30.6, 180.2, 230.9], [200, 0, 248, 96]]


@pytest.mark.parametrize("resize_mode", ["model", "shortest", "longest", "squash"])
async def test_each_box_embeds_as_its_crop_through_embed(
    tiny_settings: Callable[..., Settings], resize_mode: str
) -> None:
    async with serve(tiny_settings(resize_mode=resize_mode, warmup=False)) as (_, client):
        body = await assert_parity(client, frame_image(), BOXES)
    assert body["descriptors"] is None
    assert body["dtype"] == "float32"


async def test_parity_holds_with_a_projection(
    tiny_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    frame = frame_image(4)
    crops = [frame.crop((x, 0, x + 40, 120)) for x in range(0, 280, 20)]
    async with serve(tiny_settings(warmup=False)) as (_, client):
        model = (await client.get("/info")).json()["model"]
        raw = np.stack([await embed_crop(client, crop) for crop in crops])
    projection, _ = fit_pca(raw, 8, model)
    path = tmp_path / "pca8.safetensors"
    projection.save(path)
    async with serve(tiny_settings(projection=str(path), warmup=False)) as (_, client):
        body = await assert_parity(client, frame, BOXES)
    assert body["dim"] == 8


async def test_float_boxes_are_widened_to_whole_pixels(client: httpx.AsyncClient) -> None:
    body = await assert_parity(client, frame_image(), [[10.2, 20.7, 50.1, 100.9]])
    assert body["boxes"] == [[10, 20, 51, 101]]


async def test_boxes_partly_outside_are_clipped_and_reported(client: httpx.AsyncClient) -> None:
    width, height = FRAME_SIZE
    boxes = [[-15, -4.5, 60, 100], [300, 200, 400, 500]]
    body = await assert_parity(client, frame_image(), boxes)
    assert body["boxes"] == [[0, 0, 60, 100], [300, 200, width, height]]


async def test_json_and_multipart_give_the_same_answer(client: httpx.AsyncClient) -> None:
    frame = encoded(frame_image())
    as_form = (await post_frame(client, frame, BOXES)).json()
    as_json = await client.post(
        "/embed/frame", json={"image": base64.b64encode(frame).decode(), "boxes": BOXES}
    )
    assert as_json.status_code == 200, as_json.text
    assert as_json.json() == as_form


async def test_exif_orientation_is_applied_before_the_boxes(client: httpx.AsyncClient) -> None:
    upright = frame_image(5, size=(240, 320))  # what the camera saw, portrait
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    jpeg = encoded(stored, "JPEG", quality=95, exif=exif.tobytes())
    box = [20, 150, 100, 310]  # inside the portrait frame only
    response = await post_frame(client, jpeg, [box])
    assert response.status_code == 200, response.text
    decoded = Image.open(io.BytesIO(jpeg))
    decoded.load()
    from PIL import ImageOps

    oriented = ImageOps.exif_transpose(decoded)
    assert oriented.size == (240, 320)
    expected = await embed_crop(client, oriented.crop(tuple(box)))
    assert cosine(rows(response.json())[0], expected) >= 0.99999


async def test_an_empty_list_is_a_frame_with_nobody_in_it(client: httpx.AsyncClient) -> None:
    frame = encoded(frame_image())
    plain = await post_frame(client, frame, [])
    analyzed = await post_frame(client, frame, [], analyze=True)
    assert plain.status_code == analyzed.status_code == 200, plain.text + analyzed.text
    assert plain.json()["embeddings"] == plain.json()["boxes"] == []
    assert plain.json()["descriptors"] is None
    assert analyzed.json()["descriptors"] == []
    assert plain.json()["dim"] > 0


async def test_an_empty_list_still_needs_an_image(client: httpx.AsyncClient) -> None:
    response = await post_frame(client, b"not an image", [])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_image"
    assert response.json()["error"]["message"].startswith("image: ")


@pytest.mark.parametrize("boxes", [[], [[0, 0, 50, 100]]], ids=["no boxes", "a box"])
async def test_a_frame_cut_short_is_refused_with_or_without_boxes(
    client: httpx.AsyncClient, boxes: list[list[int]]
) -> None:
    whole = encoded(frame_image())
    response = await post_frame(client, whole[: len(whole) * 2 // 3], boxes)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image"
    assert error["message"].startswith("image: ")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
async def test_an_unreadable_exif_block_leaves_the_frame_as_it_is(
    client: httpx.AsyncClient, fmt: str
) -> None:
    frame = frame_image()
    plain = await post_frame(client, encoded(frame, fmt, quality=95), BOXES)
    damaged = await post_frame(
        client, encoded(frame, fmt, quality=95, exif=b"Exif\x00\x00garbage"), BOXES
    )
    assert damaged.status_code == plain.status_code == 200, damaged.text
    for a, b in zip(rows(damaged.json()), rows(plain.json()), strict=True):
        assert cosine(a, b) >= 0.99999


@pytest.mark.parametrize(
    ("boxes", "index", "words"),
    [
        ([[0, 0, 50, 100], [1, 2, 3]], 1, "four numbers"),
        ([[0, 0, 50, 100], "0,0,50,100"], 1, "four numbers"),
        ([[0, 0, 50, "100"]], 0, "four numbers"),
        ([[True, 0, 50, 100]], 0, "four numbers"),
        ([[0, 0, 50, 100], [0, 0, 50, 100], [50, 0, 50, 100]], 2, "x2 > x1"),
        ([[60, 0, 20, 100]], 0, "x2 > x1"),
        ([[0, 100, 50, 100]], 0, "y2 > y1"),
        ([[0, 0, 50, 100], [400, 0, 450, 100]], 1, "entirely outside"),
        ([[-80, -90, -10, -5]], 0, "entirely outside"),
        ([[0, 0, 5, 100]], 0, "at least 8x16"),
        ([[316, 0, 400, 100]], 0, "at least 8x16"),  # 4 px wide once clipped
        ([[0, 230, 50, 300]], 0, "at least 8x16"),
    ],
)
async def test_bad_boxes_are_refused_by_index(
    client: httpx.AsyncClient, boxes: list[Any], index: int, words: str
) -> None:
    for send in ("form", "json"):
        if send == "form":
            response = await post_frame(client, encoded(frame_image()), boxes)
        else:
            body = {"image": base64.b64encode(encoded(frame_image())).decode(), "boxes": boxes}
            response = await client.post("/embed/frame", json=body)
        assert response.status_code == 422, response.text
        message = response.json()["error"]["message"]
        assert message.startswith(f"boxes[{index}]"), message
        assert words in message


async def test_non_finite_coordinates_are_refused(client: httpx.AsyncClient) -> None:
    response = await post_frame(client, encoded(frame_image()), "[[0, 0, NaN, 100]]")
    assert response.status_code == 422
    assert "boxes[0]" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({}, "`boxes` is missing"),
        ({"boxes": "[[0, 0, 50"}, "not valid JSON"),
        ({"boxes": '{"x1": 0}'}, "JSON list"),
        ({"boxes": "[]", "analyze": "maybe"}, "true or false"),
        # Empty: was read as false, dropping what the client meant to ask for.
        ({"boxes": "[]", "analyze": ""}, "`analyze` is empty; send true or false"),
        ({"boxes": "[]", "analyze": "  "}, "`analyze` is empty; send true or false"),
    ],
)
async def test_bad_form_fields_are_explained(
    client: httpx.AsyncClient, data: dict[str, str], words: str
) -> None:
    response = await client.post(
        "/embed/frame", files={"image": ("f.png", encoded(frame_image()))}, data=data
    )
    assert response.status_code == 422, response.text
    assert words in response.json()["error"]["message"]


async def test_more_boxes_than_the_batch_limit_get_413(client: httpx.AsyncClient) -> None:
    boxes = [[0, 0, 40, 100]] * 9  # the client fixture's CLIP_MAX_BATCH_IMAGES is 8
    response = await post_frame(client, encoded(frame_image()), boxes)
    assert response.status_code == 413
    assert "CLIP_MAX_BATCH_IMAGES" in response.json()["error"]["message"]
    json_body = {"image": base64.b64encode(encoded(frame_image())).decode(), "boxes": boxes}
    assert (await client.post("/embed/frame", json=json_body)).status_code == 413


async def test_the_frame_obeys_the_pixel_limit(tiny_settings: Callable[..., Settings]) -> None:
    async with serve(tiny_settings(max_image_pixels=10_000, warmup=False)) as (_, client):
        response = await post_frame(client, encoded(frame_image()), [[0, 0, 50, 100]])
    assert response.status_code == 413
    assert "CLIP_MAX_IMAGE_PIXELS" in response.json()["error"]["message"]
    assert response.json()["error"]["message"].startswith("image: ")


async def test_float16_halves_the_bytes(client: httpx.AsyncClient) -> None:
    frame = encoded(frame_image())
    full = (await post_frame(client, frame, BOXES)).json()
    half = (await post_frame(client, frame, BOXES, params={"dtype": "float16"})).json()
    assert half["dtype"] == "float16"
    for a, b in zip(rows(full), rows(half), strict=True):
        assert len(base64.b64decode(half["embeddings"][0])) * 2 == len(
            base64.b64decode(full["embeddings"][0])
        )
        assert cosine(a, b) >= 0.999


async def test_analyze_describes_each_box(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(11)
    people = [make_person(rng) for _ in range(3)]
    crops = [Image.open(io.BytesIO(p.jpeg)).convert("RGB") for p in people]
    frame = Image.new("RGB", (sum(c.width for c in crops) + 40, max(c.height for c in crops)))
    boxes, x = [], 0
    for crop in crops:
        frame.paste(crop, (x, 0))
        boxes.append([x, 0, x + crop.width, crop.height])
        x += crop.width + 20
    response = await post_frame(client, encoded(frame), boxes, analyze=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["descriptors"]) == 3
    for person, crop, descriptor, served in zip(
        people, crops, body["descriptors"], rows(body), strict=True
    ):
        assert descriptor["top"]["color"] == person.top
        assert descriptor["bottom"]["color"] == person.bottom
        analyzed = await client.post("/analyze", files={"image": ("p.png", encoded(crop))})
        alone = analyzed.json()
        for region in ("top", "bottom"):
            # A crop's colours are the same pixels either way; its garment score comes out of
            # a forward pass in another batch, which may round differently in the last bits
            # (oneDNN picks kernels by batch size: seen on AMD EPYC, not on Intel Xeon).
            served_region, alone_region = dict(descriptor[region]), dict(alone[region])
            assert served_region.pop("type_score") == pytest.approx(
                alone_region.pop("type_score"), rel=1e-5
            )
            assert served_region == alone_region
        assert cosine(served, await embed_crop(client, crop)) >= 0.99999


async def test_analyze_over_the_queue_gets_413(tiny_settings: Callable[..., Settings]) -> None:
    settings = tiny_settings(max_queue=8, max_batch_images=8, max_batch_size=8, warmup=False)
    async with serve(settings) as (_, client):
        response = await post_frame(client, encoded(frame_image()), [[0, 0, 40, 100]] * 3, True)
    assert response.status_code == 413  # 3 boxes x 3 model inputs > CLIP_MAX_QUEUE=8
    assert "CLIP_MAX_QUEUE" in response.json()["error"]["message"]


async def test_all_boxes_share_one_forward_pass(tiny_settings: Callable[..., Settings]) -> None:
    encoders: list[CountingEncoder] = []
    # One stream: with two, a frame's boxes are shared between both (by design).
    settings = tiny_settings(max_batch_size=16, warmup=False, forward_streams=1)
    async with serve(settings, wrapping(CountingEncoder, encoders)) as (_, client):
        boxes = [[x, 0, x + 40, 120] for x in range(0, 280, 40)]
        response = await post_frame(client, encoded(frame_image()), boxes)
    assert response.status_code == 200, response.text
    assert encoders[0].batch_sizes == [len(boxes)]


class GatedEncoder(CountingEncoder):
    """Holds every forward pass until the test opens the gate."""

    gate = threading.Event()

    def encode(self, batch: Sequence[Any]) -> npt.NDArray[np.float32]:
        self.gate.wait(timeout=30)
        return super().encode(batch)


async def test_admission_counts_the_boxes(tiny_settings: Callable[..., Settings]) -> None:
    encoders: list[GatedEncoder] = []
    settings = tiny_settings(max_queue=8, max_batch_images=8, max_batch_size=8, warmup=False)
    GatedEncoder.gate.clear()
    async with serve(settings, wrapping(GatedEncoder, encoders)) as (app, client):
        boxes = [[x, 0, x + 40, 120] for x in range(0, 280, 40)]  # 7 of the 8 permits
        frame = asyncio.create_task(post_frame(client, encoded(frame_image()), boxes))
        for _ in range(200):
            if app.state.service.admission.images_in_flight:
                break
            await asyncio.sleep(0.01)
        assert app.state.service.admission.images_in_flight == len(boxes)
        two = await client.post(
            "/embed/batch",
            files=[("images", ("a.png", encoded(frame_image(8, (40, 80)))))] * 2,
        )
        assert two.status_code == 503  # 7 + 2 > 8: refused before decoding
        GatedEncoder.gate.set()
        assert (await frame).status_code == 200


async def test_auth_applies(tiny_settings: Callable[..., Settings]) -> None:
    async with serve(tiny_settings(api_keys="k1", warmup=False)) as (_, client):
        refused = await post_frame(client, encoded(frame_image()), [[0, 0, 40, 100]])
        client.headers["Authorization"] = "Bearer k1"
        allowed = await post_frame(client, encoded(frame_image()), [[0, 0, 40, 100]])
    assert refused.status_code == 401
    assert allowed.status_code == 200, allowed.text


async def test_integers_too_large_for_a_float_are_refused(client: httpx.AsyncClient) -> None:
    huge = "1" + "0" * 400  # valid JSON; float() of it overflows
    form = await post_frame(client, encoded(frame_image()), f"[[0, 0, {huge}, 100]]")
    raw = (
        '{"image": "' + base64.b64encode(encoded(frame_image())).decode() + '", '
        f'"boxes": [[0, 0, {huge}, 100]]}}'
    )
    as_json = await client.post(
        "/embed/frame", content=raw, headers={"content-type": "application/json"}
    )
    for response in (form, as_json):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["message"].startswith("boxes[0] has a value")


async def test_a_boxes_field_past_the_parsers_limit_gets_413(client: httpx.AsyncClient) -> None:
    boxes = json.dumps([[0, 0, 50, 100]] * 100_000)  # over a megabyte of text
    response = await post_frame(client, encoded(frame_image()), boxes)
    assert response.status_code == 413, response.text
    assert "CLIP_MAX_BATCH_IMAGES" in response.json()["error"]["message"]


async def test_a_number_past_pythons_digit_limit_is_a_client_error(
    client: httpx.AsyncClient,
) -> None:
    digits = "1" + "0" * 5000  # int() refuses strings of over 4300 digits
    form = await post_frame(client, encoded(frame_image()), f"[[{digits}, 20, 100, 200]]")
    assert form.status_code == 422, form.text
    assert "not valid JSON" in form.json()["error"]["message"]
    assert "more than 4300 digits" in form.json()["error"]["message"]
    assert "sys." not in form.json()["error"]["message"]  # Python's advice is not the client's
    image = base64.b64encode(encoded(frame_image())).decode()
    raw = '{"image": "' + image + '", "boxes": [[' + digits + ", 20, 100, 200]]}"
    for path in ("/embed/frame", "/embed"):
        response = await client.post(
            path, content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_json"
        assert "sys." not in response.json()["error"]["message"]
    similarity = await client.post(
        "/similarity", content='{"a": ' + digits + "}", headers={"content-type": "application/json"}
    )
    assert similarity.status_code == 400, similarity.text
    assert similarity.json()["error"]["code"] == "invalid_json"
    assert "sys." not in similarity.json()["error"]["message"]


async def test_a_field_sent_twice_is_refused_not_overwritten(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/embed/frame",
        files=[
            ("image", ("f.png", encoded(frame_image()))),
            ("boxes", (None, "[[10, 20, 100, 200]]")),
            ("boxes", (None, "[[0, 0, 50, 50]]")),
        ],
    )
    assert response.status_code == 422, response.text
    assert "`boxes` sent more than once" in response.json()["error"]["message"]


async def test_two_frames_are_refused_naming_this_endpoint(client: httpx.AsyncClient) -> None:
    frame = ("f.png", encoded(frame_image()))
    response = await client.post(
        "/embed/frame",
        files=[("image", frame), ("image", frame)],
        data={"boxes": "[[10, 20, 100, 200]]"},
    )
    assert response.status_code == 422
    assert "/embed/frame takes one" in response.json()["error"]["message"]


async def test_fields_in_the_url_are_refused_not_ignored(client: httpx.AsyncClient) -> None:
    response = await post_frame(
        client, encoded(frame_image()), [[10, 20, 100, 200]], params={"analyze": "true"}
    )
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "unexpected query parameter(s) analyze" in message
    assert "`analyze`" in message
    crop = {"image": ("c.png", encoded(frame_image(size=(64, 128))))}
    assert (await client.post("/embed", files=crop, params={"x": "1"})).status_code == 422


async def test_one_box_without_the_outer_list_is_explained(client: httpx.AsyncClient) -> None:
    response = await post_frame(client, encoded(frame_image()), [10, 20, 100, 200])
    assert response.status_code == 422
    assert "without the outer list" in response.json()["error"]["message"]


async def test_messages_show_the_boxes_as_json(client: httpx.AsyncClient) -> None:
    response = await post_frame(client, encoded(frame_image()), "[[true, 20, 100, null]]")
    assert response.status_code == 422
    assert "got [true, 20, 100, null]" in response.json()["error"]["message"]
