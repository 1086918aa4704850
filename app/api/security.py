"""API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`.

Keys come from CLIP_API_KEYS; none configured means no authentication. Comparison is
constant-time and checks every configured key, so timing tells nothing about which key
or how much of it matched. Keys are SecretStr in the settings and never logged.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.errors import Unauthorized

# auto_error=False: a missing key is our JSON 401, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`")


def key_matches(candidate: str, keys: list[bytes]) -> bool:
    supplied = candidate.encode("utf-8", errors="replace")
    matched = False
    for key in keys:  # no early exit: every key costs the same
        matched |= hmac.compare_digest(supplied, key)
    return matched


def key_from_headers(headers: dict[bytes, bytes]) -> str | None:
    """The key a request carries, read from raw ASGI headers as the dependency reads it
    (the Bearer credentials first, then X-API-Key)."""
    scheme, _, credentials = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get(b"x-api-key", b"").decode("latin-1") or None


def refusal_for_key(candidate: str | None, keys: list[bytes]) -> Unauthorized | None:
    """The 401 a request with `candidate` gets, or None if it may pass."""
    if not keys:
        return None
    if not candidate:
        return Unauthorized(
            "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
        )
    if not key_matches(candidate, keys):
        return Unauthorized("the API key is not valid")
    return None


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_header)],
) -> None:
    candidate = bearer.credentials if bearer is not None else header_key
    refusal = refusal_for_key(candidate, request.app.state.api_keys)
    if refusal is not None:
        raise refusal
