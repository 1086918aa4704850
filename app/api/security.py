"""API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`.

Keys come from CLIP_API_KEYS; none configured means no authentication. Comparison is
constant-time and checks every configured key, so timing tells nothing about which key
or how much of it matched. Keys are SecretStr in the settings and never logged.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Scope

from app.api.errors import error_response, headers_of
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


# What a request carrying its key more than once gets: servers and proxies differ on
# which copy counts (Starlette reads the first, a dict of the headers the last), so a
# valid first key could carry any second one past a proxy that checked the second.
class Repeated:
    """The key a request carrying it more than once has."""


REPEATED = Repeated()


def key_from_headers(headers: list[tuple[bytes, bytes]]) -> str | Repeated | None:
    """The key a request carries, read from raw ASGI headers as the dependency reads it
    (the Bearer credentials first, then X-API-Key); REPEATED if either header is, or if
    both carry keys and they differ."""
    authorizations = [value for name, value in headers if name == b"authorization"]
    api_keys = [value for name, value in headers if name == b"x-api-key"]
    if len(authorizations) > 1 or len(api_keys) > 1:
        return REPEATED
    authorization = authorizations[0] if authorizations else b""
    scheme, _, credentials = authorization.decode("latin-1").partition(" ")
    bearer = credentials.strip() if scheme.lower() == "bearer" else ""
    header_key = api_keys[0].decode("latin-1") if api_keys else ""
    if bearer and header_key and bearer != header_key:
        # Two different keys: whichever one this service read, a proxy may check the other.
        return REPEATED
    return bearer or header_key or None


def refusal_for_key(candidate: str | Repeated | None, keys: list[bytes]) -> Unauthorized | None:
    """The 401 a request with `candidate` gets, or None if it may pass."""
    if not keys:
        return None
    if isinstance(candidate, Repeated):
        return Unauthorized(
            "the request carries more than one API key (an Authorization or X-API-Key "
            "header twice, or the two headers with different keys); send the API key once"
        )
    if not candidate:
        return Unauthorized(
            "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
        )
    if not key_matches(candidate, keys):
        return Unauthorized("the API key is not valid")
    return None


def unauthorized_answer(scope: Scope) -> JSONResponse | None:
    """The 401 for a POST refused below the routes (busy, too large, compressed) whose
    key is missing or wrong, counted; None if its key passes. Without a valid key a
    refusal says only that: a limit is no business of a caller without one, and a 503
    it would retry for ever."""
    state = scope["app"].state if "app" in scope else None
    refusal = refusal_for_key(key_from_headers(scope["headers"]), getattr(state, "api_keys", []))
    if refusal is None:
        return None
    metrics = getattr(state, "metrics", None)
    if metrics is not None:
        metrics.rejections.labels(refusal.code).inc()
    return error_response(401, refusal.code, refusal.message, headers_of(refusal))


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_header)],
) -> None:
    # `bearer` and `header_key` put the two schemes in /docs; the key is read as the
    # middlewares read it, so a request gets the same answer at every layer.
    del bearer, header_key
    refusal = refusal_for_key(
        key_from_headers(request.scope["headers"]), request.app.state.api_keys
    )
    if refusal is not None:
        raise refusal
