"""One value per field: a repeated JSON key or URL parameter is a 422, never "the last
one wins".

json.loads and FastAPI's query parsing keep the last of repeated names silently, so
`{"image": A, "image": B}` embedded B and `?dtype=float32&dtype=float16` answered in
float16: a client with a bug in how it builds requests would never learn of it.
Multipart forms already refuse repeated fields (app/api/inputs.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from app.api.body_limit import CodedHTTPException
from app.api.errors import SEND_JSON, shown
from app.errors import ValidationFailed


class DuplicateKey(ValueError):
    """A JSON object names one key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(f"field `{shown(key)}` appears more than once; send it once")
            seen.add(key)
    return document


NESTED_TOO_DEEPLY = "body JSON is nested too deeply ([[[[...]]]]); send the flat shape /docs shows"


def json_error(exc: ValueError) -> str:
    """What is wrong with JSON that would not parse, for a client: Python's own message
    for an over-long integer says to call sys.set_int_max_str_digits()."""
    if "integer string conversion" in str(exc):
        return "it holds an integer of more than 4300 digits"
    return str(exc)


def _looks_like_multipart(body: bytes) -> bool:
    head = body[:2048].lstrip()
    return head.startswith(b"--") and b"content-disposition" in head.lower()


def not_json_message(exc: ValueError, body: bytes) -> str:
    """Why `body`, sent as JSON, would not parse, and what to send instead: one wording
    for every route, whether it parses its own body or FastAPI does."""
    if _looks_like_multipart(body):
        return (
            "body is not valid JSON: it looks like multipart/form-data (what curl -F sends); "
            f"send it with that Content-Type and no other, or {SEND_JSON}"
        )
    return f"body is not valid JSON: {json_error(exc)}; {SEND_JSON}"


def loads_unique(body: bytes | str) -> Any:
    """json.loads, but DuplicateKey for an object with a repeated key."""
    return json.loads(body, object_pairs_hook=_unique_keys)


def repeated_query_parameters(request: Request) -> list[str]:
    params = request.query_params
    return sorted({name for name in params if len(params.getlist(name)) > 1})


def refuse_unknown_query_parameters(request: Request, allowed: set[str], body_fields: str) -> None:
    """ValidationFailed for URL parameters the route does not take: FastAPI ignores
    them, and a client that put a body field there (`?top_k=1`, `?analyze=true`) would
    never learn it was dropped."""
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        takes = ", ".join(f"`{name}`" for name in sorted(allowed)) or "nothing"
        raise ValidationFailed(
            f"unexpected query parameter(s) {shown(', '.join(unknown))}; the URL takes only "
            f"{takes}, the body takes {body_fields}"
        )


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = loads_unique(body)
            except DuplicateKey as exc:
                # HTTPException: FastAPI's body parsing lets it through as it stands.
                raise HTTPException(422, str(exc)) from None
            except ValueError as exc:
                # FastAPI would say "error parsing the body" for anything but a syntax
                # error (not UTF-8, an integer of 5000 digits), and give a syntax error
                # another wording than the routes that parse their own bodies.
                raise CodedHTTPException(400, "invalid_json", not_json_message(exc, body)) from None
            except RecursionError:  # FastAPI would call it a parse error of any kind
                raise CodedHTTPException(400, "invalid_json", NESTED_TOO_DEEPLY) from None
        return self._json


class StrictRoute(APIRoute):
    """An APIRoute whose requests refuse repeated URL parameters and JSON keys."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            repeated = repeated_query_parameters(request)
            if repeated:
                names = ", ".join(f"`{name[:64]}`" for name in repeated[:5])
                raise HTTPException(
                    422, f"URL parameter(s) {names} sent more than once; send each once"
                )
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict_handler
