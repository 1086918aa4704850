"""What the README and the schema promise, checked against what the service answers
(issue 12): error codes, limits, examples, base64 leniency and schema strictness."""

from __future__ import annotations

import asyncio
import base64
import gzip
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from app.codec import decode_embedding, encode_embedding
from app.config import Settings
from tests.conftest import serve
from tests.helpers import cosine, http_scope, noise_jpeg


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()["error"]
    return response.status_code, body["code"], body["message"]


# 1. A multipart body the parser cannot read is invalid_multipart, not a bare 400.
@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"x"),  # no boundary at all
        ("multipart/form-data; charset=utf-8", b"--zzz\r\n"),
    ],
)
async def test_a_malformed_multipart_body_is_invalid_multipart(
    client: httpx.AsyncClient, content_type: str, body: bytes
) -> None:
    response = await client.post("/embed", content=body, headers={"content-type": content_type})
    status, code, message = error_of(response)
    assert (status, code) == (400, "invalid_multipart")
    assert "multipart" in message


def multipart_head(boundary: str, name: str = "image") -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="c.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("part_headers", "said"),
    [
        (f'Content-Disposition: form-data; name="image"; filename="{"a" * 5000}.jpg"',
         "a part's header line is over 4224 bytes"),
        ('Content-Disposition: form-data; name="image"; filename="c.jpg"\r\n'
         + "X-Camera: 7\r\n" * 9 + "Content-Type: image/jpeg",
         "a part has over 8 headers"),
        ('Content-Disposition: form-data; name="image"; filename="c.jpg"\r\nX\x00: y',
         "Found invalid character 0 in header"),
    ],
    ids=["long header", "many headers", "bad header byte"],
)  # fmt: skip
async def test_a_part_header_the_parser_refuses_is_named_not_invalid_multipart_data(
    client: httpx.AsyncClient, part_headers: str, said: str
) -> None:
    """Starlette reports each of these as "Invalid multipart data"; the parser's own
    fault is what the client can fix."""
    body = b"--XyZ\r\n" + part_headers.encode() + b"\r\n\r\n" + noise_jpeg(4) + b"\r\n--XyZ--\r\n"
    response = await client.post(
        "/embed", content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"}
    )
    status, code, message = error_of(response)
    assert (status, code) == (400, "invalid_multipart")
    assert said in message
    assert "Invalid multipart data" not in message


@pytest.mark.parametrize(
    ("path", "name", "body"),
    [
        ("/embed", "image", multipart_head("XyZ") + noise_jpeg(4)[:300]),  # cut mid-file
        ("/embed", "image", multipart_head("XyZ") + noise_jpeg(4) + b"\r\n"),  # no close
        ("/embed", "image", b"--XyZ\r\ngarbage"),
        ("/embed/batch", "images", multipart_head("XyZ", "images") + noise_jpeg(4)[:300]),
        ("/analyze", "image", multipart_head("XyZ") + noise_jpeg(4)[:300]),
        ("/embed/frame", "image", multipart_head("XyZ") + noise_jpeg(4)[:300]),
        (
            "/embed/batch",
            "images",  # one whole part, the second cut short: not one image answered
            multipart_head("XyZ", "images") + noise_jpeg(4) + b"\r\n"
            + multipart_head("XyZ", "images") + noise_jpeg(5)[:200],
        ),
    ],
)  # fmt: skip
async def test_a_multipart_body_cut_short_is_invalid_multipart(
    client: httpx.AsyncClient, path: str, name: str, body: bytes
) -> None:
    response = await client.post(
        path, content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"}
    )
    status, code, message = error_of(response)
    assert (status, code) == (400, "invalid_multipart")
    assert "--XyZ--" in message


async def test_a_closing_boundary_split_across_chunks_is_found(
    tiny_app: tuple[Any, httpx.AsyncClient],
) -> None:
    """The body in 3-byte messages, as a slow uplink might deliver it: the preamble's
    end, the opening boundary and `--XyZ--` (7) all span several messages."""
    app, _ = tiny_app
    body = b"preamble\r\n" + multipart_head("XyZ") + noise_jpeg(4) + b"\r\n--XyZ--\r\n"
    chunks = [body[i : i + 3] for i in range(0, len(body), 3)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        await asyncio.sleep(3600)  # the client waits for its answer
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [
        (b"content-type", b"multipart/form-data; boundary=XyZ"),
        (b"content-length", str(len(body)).encode()),
    ]
    await asyncio.wait_for(app(http_scope("/embed", headers), receive, send), 30)
    assert sent[0]["status"] == 200, sent[1]["body"]


async def test_a_multipart_preamble_is_ignored(client: httpx.AsyncClient) -> None:
    """RFC 2046 5.1.1: text before the first boundary is to be ignored."""
    crop = noise_jpeg(4)
    body = b"This is a preamble.\r\n" + multipart_head("XyZ") + crop + b"\r\n--XyZ--\r\n"
    response = await client.post(
        "/embed", content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"}
    )
    assert response.status_code == 200, response.text
    plain = await client.post("/embed", files={"image": ("c.jpg", crop, "image/jpeg")})
    assert response.json()["embedding"] == plain.json()["embedding"]


async def test_a_whole_multipart_body_with_an_epilogue_is_read(
    client: httpx.AsyncClient,
) -> None:
    body = multipart_head("XyZ") + noise_jpeg(4) + b"\r\n--XyZ--\r\nan epilogue, ignored\r\n"
    response = await client.post(
        "/embed", content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"}
    )
    assert response.status_code == 200, response.text


# 2. Past the parser's file limit the answer is the same 413 as one file over the limit.
@pytest.mark.parametrize("extra", [1, 2, 30])
async def test_too_many_files_is_413_naming_the_setting(
    client: httpx.AsyncClient, extra: int
) -> None:
    crop = noise_jpeg(1, (16, 32))
    files = [("images", (f"{i}.jpg", crop, "image/jpeg")) for i in range(8 + extra)]
    status, code, message = error_of(await client.post("/embed/batch", files=files))
    assert (status, code) == (413, "payload_too_large")
    assert "CLIP_MAX_BATCH_IMAGES" in message


# 3. float16 bytes read as float32 are refused with the fix, not scored.
async def test_similarity_refuses_a_dimension_that_is_not_the_models(
    client: httpx.AsyncClient,
) -> None:
    halves = []
    for seed in (1, 2):
        reply = await client.post(
            "/embed?dtype=float16", files={"image": ("c.jpg", noise_jpeg(seed))}
        )
        halves.append(reply.json()["embedding"])
    dim = (await client.get("/info")).json()["dim"]
    status, code, message = error_of(
        await client.post("/similarity", json={"a": halves[0], "b": halves[1]})
    )
    assert (status, code) == (422, "validation_error")
    assert f"{dim // 2} values" in message
    assert str(dim) in message
    assert "float16" in message

    truth = cosine(decode_embedding(halves[0], "float16"), decode_embedding(halves[1], "float16"))
    in_body = await client.post(
        "/similarity", json={"a": halves[0], "b": halves[1], "dtype": "float16"}
    )
    in_query = await client.post("/similarity?dtype=float16", json={"a": halves[0], "b": halves[1]})
    assert in_body.json()["similarity"] == pytest.approx(truth, abs=1e-4)
    assert in_query.json()["similarity"] == pytest.approx(truth, abs=1e-4)
    contradiction = await client.post(
        "/similarity?dtype=float16", json={"a": halves[0], "b": halves[1], "dtype": "float32"}
    )
    assert error_of(contradiction)[:2] == (422, "validation_error")
    search = await client.post("/similarity", json={"queries": [halves[0]], "gallery": [halves[1]]})
    assert error_of(search)[:2] == (422, "validation_error")


# 4. Every request example in the schema is a request the service answers with 200.
async def test_the_schemas_request_examples_are_served(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    tried = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            content = operation.get("requestBody", {}).get("content", {})
            schema = content.get("application/json", {}).get("schema")
            if schema is None:
                continue
            for example in _examples(schema, schemas):
                response = await client.request(method, path, json=example)
                assert response.status_code == 200, (path, example, response.text)
                tried += 1
    assert tried >= 5  # /embed, /embed/batch, /analyze, both /similarity forms


async def test_the_schemas_response_examples_decode_to_their_dim(
    client: httpx.AsyncClient,
) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    checked = 0
    for name, schema in schemas.items():
        properties = schema.get("properties", {})
        fields = [f for f in ("embedding", "embeddings") if f in properties]
        if "dim" not in properties or not fields:
            continue  # /info has a dim and no vectors
        dim = properties["dim"]["examples"][0]
        examples = properties[fields[0]]["examples"][0]
        for encoded in [examples] if isinstance(examples, str) else examples:
            values = decode_embedding(encoded, "float32")
            assert values.shape == (dim,), name
            assert np.linalg.norm(values) == pytest.approx(1.0, abs=1e-5), name
            checked += 1
    assert checked >= 4  # /embed, /embed/batch, /embed/frame, /analyze


def _examples(schema: dict[str, Any], schemas: dict[str, Any]) -> list[dict[str, Any]]:
    if "$ref" in schema:
        return _examples(schemas[schema["$ref"].rsplit("/", 1)[-1]], schemas)
    if "oneOf" in schema:
        return [e for option in schema["oneOf"] for e in _examples(option, schemas)]
    if "examples" in schema:
        return list(schema["examples"])
    example = {
        name: prop["examples"][0]
        for name, prop in schema.get("properties", {}).items()
        if "examples" in prop
    }
    return [example] if example else []


# 5. /metrics' 401 is JSON, and the schema says so.
async def test_metrics_401_is_json_as_documented(tiny_settings: Callable[..., Settings]) -> None:
    async with serve(tiny_settings(api_keys="secret-key")) as (_, client):
        response = await client.get("/metrics")
        document = (await client.get("/openapi.json", headers={"X-API-Key": "secret-key"})).json()
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/json")
    declared = document["paths"]["/metrics"]["get"]["responses"]["401"]["content"]
    assert list(declared) == ["application/json"]
    # One media type for its 200, as sent less its parameters: a second key carrying
    # them ("text/plain; version=1.0.0; charset=utf-8", no schema) broke generated clients.
    ok = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert ok == {"text/plain": {"schema": {"type": "string"}}}


# 6. MIME base64 (76-column lines) is read as RFC 2045 decoders read it.
async def test_base64_with_line_breaks_is_accepted(client: httpx.AsyncClient) -> None:
    crop = noise_jpeg(3)
    plain = await client.post("/embed", json={"image": base64.b64encode(crop).decode()})
    wrapped = await client.post("/embed", json={"image": base64.encodebytes(crop).decode()})
    unpadded = await client.post(
        "/embed", json={"image": base64.b64encode(crop).decode().rstrip("=")}
    )
    assert plain.status_code == wrapped.status_code == unpadded.status_code == 200
    assert wrapped.json()["embedding"] == plain.json()["embedding"]
    vector = decode_embedding(plain.json()["embedding"])
    lines = base64.encodebytes(vector.astype("<f4").tobytes()).decode()
    pair = await client.post("/similarity", json={"a": lines, "b": plain.json()["embedding"]})
    assert pair.json()["similarity"] == pytest.approx(1.0, abs=1e-6)


async def test_url_safe_base64_is_refused_saying_so(client: httpx.AsyncClient) -> None:
    crop = bytes(range(250, 256)) * 50  # bytes whose base64 has - and _ when URL-safe
    text = base64.urlsafe_b64encode(crop).decode()
    status, code, message = error_of(await client.post("/embed", json={"image": text}))
    assert (status, code) == (400, "invalid_base64")
    assert "URL-safe" in message


# 7. The schema says what the service enforces.
async def test_the_schema_states_the_enforced_shapes(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    info = (await client.get("/info")).json()
    batch = document["paths"]["/embed/batch"]["post"]["requestBody"]["content"]
    form = batch["multipart/form-data"]["schema"]
    assert form["additionalProperties"] is False
    assert form["properties"]["images"]["minItems"] == 1
    assert form["properties"]["images"]["maxItems"] == info["limits"]["max_batch_images"]
    assert batch["application/json"]["schema"]["properties"]["images"]["maxItems"] == 8
    similarity = document["paths"]["/similarity"]["post"]["requestBody"]["content"]
    forms = similarity["application/json"]["schema"]["oneOf"]
    assert len(forms) == 2
    search = document["components"]["schemas"]["SearchSimilarityRequest"]["properties"]
    assert search["top_k"]["maximum"] == info["limits"]["max_top_k"]
    assert search["queries"]["maxItems"] == info["limits"]["max_queries"]
    assert search["gallery"]["maxItems"] == info["limits"]["max_gallery"]
    # An empty base64 string is a 400 naming the field: not a string the schema allows.
    pair = document["components"]["schemas"]["PairSimilarityRequest"]["properties"]
    assert pair["a"]["minLength"] == pair["b"]["minLength"] == 1
    assert search["queries"]["items"]["minLength"] == search["gallery"]["items"]["minLength"] == 1
    assert batch["application/json"]["schema"]["properties"]["images"]["items"]["minLength"] == 1
    for path in ("/embed", "/analyze", "/embed/frame"):
        content = document["paths"][path]["post"]["requestBody"]["content"]
        assert content["application/json"]["schema"]["properties"]["image"]["minLength"] == 1


@pytest.mark.parametrize("top_k", ["3", True, 2.5])
async def test_top_k_must_be_an_integer(client: httpx.AsyncClient, top_k: object) -> None:
    unit = encode_embedding(np.eye(1, (await client.get("/info")).json()["dim"])[0])
    response = await client.post(
        "/similarity", json={"queries": [unit], "gallery": [unit], "top_k": top_k}
    )
    assert error_of(response)[:2] == (422, "validation_error")


async def test_an_empty_similarity_body_says_what_to_send(client: httpx.AsyncClient) -> None:
    status, code, message = error_of(await client.post("/similarity", json={}))
    assert (status, code) == (422, "validation_error")
    assert "not both" not in message
    assert "`a` and `b`" in message


async def test_each_error_status_shows_its_own_example(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    expected = {"400": "invalid_image", "413": "payload_too_large", "415":
                "unsupported_media_type", "422": "validation_error", "503": "overloaded",
                "504": "timeout", "500": "inference_failed"}  # fmt: skip
    responses = document["paths"]["/embed"]["post"]["responses"]
    for status, code in expected.items():
        example = responses[status]["content"]["application/json"]["example"]
        assert example["error"]["code"] == code


# 8. A client can discover every search limit.
async def test_info_lists_the_search_limits(client: httpx.AsyncClient) -> None:
    limits = (await client.get("/info")).json()["limits"]
    for name in ("max_queries", "max_gallery", "max_top_k", "max_search_scores"):
        assert isinstance(limits[name], int)


# Repeated names: one value per field, whichever form it comes in.
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/embed", '{"image": "%s", "image": "%s"}'),
        ("/embed/batch", '{"images": ["%s"], "images": ["%s"]}'),
        ("/analyze", '{"image": "%s", "include_embedding": true, "include_embedding": false}'),
        ("/similarity", '{"a": "%s", "b": "%s", "b": "%s"}'),
    ],
)
async def test_a_repeated_json_key_is_422(client: httpx.AsyncClient, path: str, body: str) -> None:
    value = (
        encode_embedding(np.ones(64))
        if path == "/similarity"
        else base64.b64encode(noise_jpeg(1)).decode()
    )
    content = body.replace("%s", value).encode()
    response = await client.post(
        path, content=content, headers={"content-type": "application/json"}
    )
    status, code, message = error_of(response)
    assert (status, code) == (422, "validation_error")
    assert "more than once" in message


async def test_a_repeated_url_parameter_is_422(client: httpx.AsyncClient) -> None:
    crop = noise_jpeg(1)
    response = await client.post(
        "/embed?dtype=float32&dtype=float16", files={"image": ("c.jpg", crop, "image/jpeg")}
    )
    status, code, message = error_of(response)
    assert (status, code) == (422, "validation_error")
    assert "`dtype`" in message
    vector = encode_embedding(np.ones(64))
    response = await client.post(
        "/similarity?dtype=float32&dtype=float32", json={"a": vector, "b": vector}
    )
    assert error_of(response)[:2] == (422, "validation_error")
    single = await client.post("/embed?dtype=float16", files={"image": ("c.jpg", crop)})
    assert single.status_code == 200


async def test_errors_quote_client_input_at_bounded_length(client: httpx.AsyncClient) -> None:
    """A megabyte field name is named in the answer, not copied into it (nor the log)."""
    crop = base64.b64encode(noise_jpeg(1)).decode()
    huge, long = "k" * 1_000_000, "k" * 50_000  # a URL or header has its own limits
    for response in (
        await client.post("/embed", json={"image": crop, huge: 1}),
        await client.post(f"/embed?{long}=1", json={"image": crop}),
        await client.post("/embed", content=b"x", headers={"content-type": "text/" + long}),
        await client.post("/similarity", content=b"{}", headers={"content-type": "x/" + long}),
    ):
        assert 400 <= response.status_code < 500
        assert len(response.content) < 2000, response.content[:200]
        assert "characters)" in response.json()["error"]["message"]
    # A form field's name that long is more than the multipart parser reads.
    response = await client.post("/embed", files={"image": ("c.jpg", noise_jpeg(1)), huge: "1"})
    assert response.status_code == 400
    assert len(response.content) < 2000


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/embed/"), ("POST", "/embed/batch//"), ("GET", "/health/")]
)
async def test_a_trailing_slash_is_a_404_naming_the_endpoint(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path, files={"image": ("p.png", b"x")})
    status, code, message = error_of(response)
    assert (status, code) == (404, "not_found")  # not a 307 with an empty body
    assert "location" not in response.headers
    assert message.endswith(f"the endpoint is {path.rstrip('/')}")


@pytest.mark.parametrize(
    "path", ["/health", "/ready", "/info", "/metrics", "/docs", "/openapi.json"]
)
async def test_head_is_answered_wherever_get_is(client: httpx.AsyncClient, path: str) -> None:
    get = await client.get(path)
    head = await client.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # its counters move between the two requests
        assert head.headers["content-length"] == str(len(get.content))


async def test_validation_errors_name_items_as_the_other_errors_do(
    client: httpx.AsyncClient,
) -> None:
    image = base64.b64encode(noise_jpeg(0)).decode()
    response = await client.post("/embed/batch", json={"images": [image, 5]})
    status, code, message = error_of(response)
    assert (status, code) == (422, "validation_error")
    assert message.startswith("images[1]: "), message  # as invalid_image says images[1]
    search = {"queries": [encode_embedding(np.ones(512, np.float32))], "gallery": ["a", 5]}
    message = error_of(await client.post("/similarity", json=search))[2]
    assert message.startswith("gallery[1]: "), message


@pytest.mark.parametrize("path", ["/embed", "/embed/batch", "/analyze", "/similarity"])
async def test_json_nested_past_the_parser_is_named_as_such(
    client: httpx.AsyncClient, path: str
) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    response = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert error_of(response)[:2] == (400, "invalid_json")
    assert "nested too deeply" in error_of(response)[2]


async def test_a_wrong_path_or_method_says_what_to_do(client: httpx.AsyncClient) -> None:
    status, code, message = error_of(await client.get("/embeds"))
    assert (status, code) == (404, "not_found")
    assert "/embeds" in message
    assert "/docs" in message
    response = await client.get("/embed")
    status, code, message = error_of(response)
    assert (status, code) == (405, "method_not_allowed")
    assert "POST" in message
    assert response.headers["allow"] == "POST"
    assert (await client.head("/embed")).status_code == 405
    for path in ("/health", "/ready", "/info", "/metrics", "/openapi.json", "/docs"):
        refused = await client.post(path)
        assert refused.status_code == 405
        assert refused.headers["allow"] == "GET, HEAD"
        assert "GET, HEAD" in error_of(refused)[2]


@pytest.mark.parametrize(
    ("header", "coding", "plain"),
    [
        ("content-encoding", "gzip", "identity"),
        ("content-encoding", "br", "identity"),
        ("content-encoding", "deflate, gzip", "identity"),
        # The server takes the chunked framing off and nothing else: a `gzip, chunked`
        # body reached the routes compressed, and was read as if it were not.
        ("transfer-encoding", "gzip, chunked", "chunked"),
        ("transfer-encoding", "deflate,chunked", "chunked"),
        ("transfer-encoding", "x-custom, chunked", "chunked"),
    ],
)
async def test_a_compressed_body_is_415_naming_the_coding(
    client: httpx.AsyncClient, header: str, coding: str, plain: str
) -> None:
    body = b'{"image": "%s"}' % base64.b64encode(noise_jpeg(1))
    response = await client.post(
        "/embed",
        content=gzip.compress(body),
        headers={"content-type": "application/json", header: coding},
    )
    status, code, message = error_of(response)
    assert (status, code) == (415, "unsupported_media_type")
    assert coding.split(",")[0] in message
    if header == "content-encoding":
        assert response.headers["accept-encoding"] == "identity"
    else:
        assert "chunked alone" in message
    uncoded = await client.post(
        "/embed", content=body, headers={"content-type": "application/json", header: plain}
    )
    assert uncoded.status_code == 200


@pytest.mark.parametrize("body", [b'{"a":', b"not json", b'{"a": "x",}'])
async def test_similarity_answers_malformed_json_as_every_route_does(
    client: httpx.AsyncClient, body: bytes
) -> None:
    headers = {"content-type": "application/json"}
    similarity = error_of(await client.post("/similarity", content=body, headers=headers))
    embed = error_of(await client.post("/embed", content=body, headers=headers))
    assert similarity[:2] == embed[:2] == (400, "invalid_json")
    assert "not valid JSON" in similarity[2]
