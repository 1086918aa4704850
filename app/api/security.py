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


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_header)],
) -> None:
    keys: list[bytes] = request.app.state.api_keys
    if not keys:
        return
    candidate = bearer.credentials if bearer is not None else header_key
    if not candidate:
        raise Unauthorized(
            "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
        )
    if not key_matches(candidate, keys):
        raise Unauthorized("the API key is not valid")
