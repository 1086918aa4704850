"""API keys: required everywhere but /health and /ready when configured."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import pytest

from app.api.security import key_matches
from app.config import Settings
from tests.conftest import serve
from tests.helpers import noise_jpeg

KEYS = "first-key-123,second-key-456"


async def test_no_keys_configured_means_open(client: httpx.AsyncClient) -> None:
    assert (await client.get("/info")).status_code == 200


async def test_keys_guard_every_endpoint_but_health_and_ready(
    tiny_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    crop = {"image": ("c.jpg", noise_jpeg(1))}
    async with serve(tiny_settings(api_keys=KEYS)) as (_, client):
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        for method, path, kwargs in [
            ("POST", "/embed", {"files": crop}),
            ("POST", "/embed/batch", {"files": {"images": crop["image"]}}),
            ("POST", "/analyze", {"files": crop}),
            ("POST", "/similarity", {"json": {"a": "AACAPw==", "b": "AACAPw=="}}),
            ("GET", "/info", {}),
        ]:
            missing = await client.request(method, path, **kwargs)
            assert missing.status_code == 401, path
            assert missing.json()["error"]["code"] == "unauthorized"
            assert "Bearer" in missing.headers["WWW-Authenticate"]
            wrong = await client.request(
                method, path, headers={"X-API-Key": "first-key-124"}, **kwargs
            )
            assert wrong.status_code == 401
            assert wrong.json()["error"]["message"] == "the API key is not valid"
        bearer = await client.post(
            "/embed", files=crop, headers={"Authorization": "Bearer second-key-456"}
        )
        assert bearer.status_code == 200
        header = await client.post("/embed", files=crop, headers={"X-API-Key": "first-key-123"})
        assert header.status_code == 200
        schema = (await client.get("/openapi.json")).json()
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])
    assert "security" in schema["paths"]["/embed"]["post"]
    assert "security" not in schema["paths"]["/health"]["get"]
    assert "first-key-123" not in caplog.text
    assert "second-key-456" not in caplog.text


def test_key_comparison() -> None:
    keys = [b"alpha", b"beta"]
    assert key_matches("beta", keys)
    assert not key_matches("bet", keys)
    assert not key_matches("", keys)
    assert not key_matches("\u00e9", keys)


@pytest.mark.parametrize(
    "headers",
    [
        [("X-API-Key", "first-key-123"), ("X-API-Key", "not-a-key")],
        [("X-API-Key", "not-a-key"), ("X-API-Key", "first-key-123")],
        [("Authorization", "Bearer first-key-123"), ("Authorization", "Bearer nope")],
        [("Authorization", "Bearer first-key-123"), ("X-API-Key", "nope")],
        [("X-API-Key", "first-key-123"), ("Authorization", "Bearer nope")],
    ],
)
async def test_a_key_sent_twice_is_refused_whichever_copy_is_valid(
    tiny_settings: Callable[..., Settings], headers: list[tuple[str, str]]
) -> None:
    """Servers and proxies differ on which copy of a repeated header counts: a valid
    first key carried any second one through."""
    crop = {"image": ("c.jpg", noise_jpeg(1))}
    async with serve(tiny_settings(api_keys=KEYS)) as (_, client):
        response = await client.post("/embed", files=crop, headers=httpx.Headers(headers))
        assert response.status_code == 401
        assert "more than one" in response.json()["error"]["message"]
        both = [("Authorization", "Bearer first-key-123"), ("X-API-Key", "first-key-123")]
        accepted = await client.post("/embed", files=crop, headers=httpx.Headers(both))
        assert accepted.status_code == 200  # one of each is not a repeat


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Length": "99999999"},  # over CLIP_MAX_UPLOAD_BYTES: 413 with a key
        {"Content-Encoding": "gzip"},  # 415 with a key
        {"Transfer-Encoding": "gzip, chunked"},  # 415 with a key
    ],
)
async def test_refusals_from_the_headers_answer_a_caller_without_a_key_with_401(
    tiny_settings: Callable[..., Settings], headers: dict[str, str]
) -> None:
    """A limit is no business of a caller without a key: it gets the 401 the routes give."""
    async with serve(tiny_settings(api_keys=KEYS)) as (_, client):
        for key, refused in ((None, True), ("nope", True), ("first-key-123", False)):
            sent = {"Content-Type": "application/json", **headers}
            if key is not None:
                sent["X-API-Key"] = key
            response = await client.post("/embed", content=b"{}", headers=sent)
            if refused:
                assert response.status_code == 401, response.text
                assert response.json()["error"]["code"] == "unauthorized"
            else:  # with a valid key, the limit itself
                assert response.status_code in (413, 415), response.text


@pytest.mark.parametrize("keys", ["", KEYS])
async def test_the_ready_line_says_whether_callers_need_a_key(
    tiny_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture, keys: str
) -> None:
    """An operator reading the start-up log learns whether the service is open, without
    it quoting a key."""
    with caplog.at_level(logging.INFO, logger="app"):
        async with serve(tiny_settings(api_keys=keys, warmup=False)):
            pass
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready: ")]
    assert len(ready) == 1, ready
    assert "torch fp32" in ready[0]
    listed = [key for key in keys.split(",") if key]
    expected = f"API keys: required ({len(listed)} set)" if listed else "API keys: none"
    assert expected in ready[0]
    assert not any(key in caplog.text for key in listed)
