"""Every error leaves as `{"error": {"code", "message"}}`, whoever raised it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from app.errors import (
    ClientDisconnected,
    InferenceFailed,
    InvalidBase64,
    InvalidEmbedding,
    InvalidImage,
    InvalidRequest,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimedOut,
    ServiceError,
    ShuttingDown,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
)

logger = logging.getLogger(__name__)

# How each kind of failure travels over HTTP. Looked up along the class's MRO, so a
# subclass (the batcher's BatchFailed) answers as its parent does.
_STATUS: dict[type[ServiceError], int] = {
    InvalidImage: 400,
    InvalidEmbedding: 400,
    InvalidBase64: 400,
    InvalidRequest: 400,
    Unauthorized: 401,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    ValidationFailed: 422,
    ClientDisconnected: 499,  # as nginx logs it; nobody reads this answer
    InferenceFailed: 500,
    Overloaded: 503,
    ShuttingDown: 503,
    NotReady: 503,
    RequestTimedOut: 504,
}


def status_of(error: ServiceError) -> int:
    for kind in type(error).__mro__:
        if kind in _STATUS:
            return _STATUS[kind]
    return 500


def headers_of(error: ServiceError) -> dict[str, str] | None:
    headers: dict[str, str] = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="clip-reid"'
    return headers or None


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    499: "client_disconnected",
}


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def shown(text: object, limit: int = 80) -> str:
    """Client input as an error message quotes it: at most `limit` characters, so a
    megabyte field name costs neither a megabyte answer nor a megabyte log line."""
    value = str(text)
    if len(value) <= limit:
        return value
    return f"{value[:limit]}... ({len(value)} characters)"


def _location(loc: Sequence[object]) -> str:
    """A field's place as the service's own messages write it: `images[2]`, `boxes[0][3]`,
    `top_k`; pydantic's own `images.2` read differently from the same item elsewhere."""
    location = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            location += f"[{part}]"
        else:
            location += f"{'.' if location else ''}{shown(part)}"
    return location


def describe_validation_errors(errors: list[Any]) -> str:
    parts = []
    for error in errors[:5]:
        location = _location(error.get("loc", ()))
        message = shown(error.get("msg", "invalid"), 300)
        if "input" in error and error["input"] is None and message.startswith("Input should"):
            # "Input should be a valid integer" of a null reads as if the value were lost.
            message = f"null was sent; {message[0].lower()}{message[1:]}"
            message += " (a field that has a default may be left out; /docs shows which)"
        parts.append(f"{location or 'body'}: {message}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts)


def _count(request: Request, code: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rejections.labels(code).inc()


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    _count(request, exc.code)
    status = status_of(exc)
    # No tracebacks here: a refusal is not a fault, and a failed forward pass was logged
    # once, with its traceback, by the batcher (one line per batch, not per request).
    if status >= 500 and status not in (503, 504):
        logger.error("request failed: %s: %s", exc.code, exc.message)
    elif status in (503, 504):
        logger.warning("request refused: %s: %s", exc.code, exc.message)
    else:
        logger.info("request refused: %s: %s", exc.code, exc.message)
    return error_response(status, exc.code, exc.message, headers_of(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors):
        # FastAPI reads an empty body as a missing one: a malformed request (400), as
        # the routes that parse their own JSON say, not a missing field.
        _count(request, "invalid_json")
        return error_response(400, "invalid_json", EMPTY_JSON_BODY)
    _count(request, "validation_error")
    return error_response(422, "validation_error", describe_validation_errors(errors))


_FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"
SEND_JSON = "send a JSON object as the schema in /docs shows"
EMPTY_JSON_BODY = f"body is empty; {SEND_JSON}"


def _is_routed(app: FastAPI, path: str) -> bool:
    """Whether the app has an endpoint at `path` (Starlette's own redirect_slashes test)."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": ""}
    return any(route.matches(scope)[0] != Match.NONE for route in app.router.routes)


def missing_endpoint(app: FastAPI, path: str, shown_path: str) -> str | None:
    """The 404 message for a request to `path` (decoded, as the scope holds it; written
    as `shown_path`, its URL's), or None where the app has an endpoint there. One
    wording while the model loads (app.api.loading) and after."""
    if _is_routed(app, path):
        return None
    bare = path.rstrip("/")
    if bare and bare != path and _is_routed(app, bare):
        return f"no endpoint at {shown(shown_path)}; the endpoint is {bare}"
    return f"no endpoint at {shown(shown_path)}; /docs lists the endpoints"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "http_error")
    message = str(exc.detail) if exc.detail else code.replace("_", " ")
    if exc.status_code == 404 and exc.detail == "Not Found":
        # A 404 of a path the app routes (a missing file of the offline docs) says so.
        message = missing_endpoint(request.app, request.scope["path"], request.url.path) or (
            f"nothing at {shown(request.url.path)}; /docs lists the endpoints"
        )
    elif exc.status_code == 405 and exc.detail == "Method Not Allowed":
        allowed = dict(exc.headers or {}).get("Allow", "")
        methods = [m.strip() for m in allowed.split(",") if m.strip()]
        if "GET" in methods:  # app.api.head answers HEAD too; one order for every route
            rest = [m for m in methods if m not in ("GET", "HEAD")]
            allowed = ", ".join(["GET", "HEAD", *rest])
            exc.headers = {**(exc.headers or {}), "Allow": allowed}
        message = (
            f"{shown(request.method, 16)} is not taken at {shown(request.url.path)}; it takes "
            f"{allowed or 'other methods'} (see /docs)"
        )
    elif exc.status_code == 400 and message == _FASTAPI_BODY_PARSE_ERROR:
        # FastAPI's own JSON parsing (the JSON-only routes) says no more than this.
        code = "invalid_json"
        message = f"body is not valid JSON (or holds a number too long to read); {SEND_JSON}"
    _count(request, code)
    return error_response(exc.status_code, code, message, dict(exc.headers or {}) or None)


async def _client_disconnected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own way of saying it (reading a body the client stopped sending): the
    # client's doing, not a fault, and nobody reads the answer.
    _count(request, "client_disconnected")
    return error_response(
        499, "client_disconnected", "the client closed the connection before the body arrived"
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    _count(request, "internal_error")
    return error_response(
        500, "internal_error", "internal error; the operator's log has the details"
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnected)
    app.add_exception_handler(Exception, _unexpected_error)


# What each status's answer looks like, for the schema and /docs: a real code and message.
_EXAMPLES: dict[int, tuple[str, str]] = {
    400: ("invalid_image", "images[2]: image data is truncated or corrupt"),
    401: ("unauthorized", "missing API key: send Authorization: Bearer <key> or X-API-Key"),
    408: ("request_timeout", "5000 bytes of the request body arrived within 30 s "
          "(CLIP_REQUEST_TIMEOUT_S), and the rest did not; send the whole body at once"),
    413: ("payload_too_large", "70 images in one request, over the limit of 64 "
          "(CLIP_MAX_BATCH_IMAGES); split the batch"),
    415: ("unsupported_media_type", "content type text/plain is not taken here; send "
          "multipart/form-data with file field `image`, or application/json"),
    422: ("validation_error", "unexpected field(s) imgae; this endpoint takes `image`"),
    500: ("inference_failed", "the forward pass (number 12, 8 images) failed; the service "
          "log has the cause"),
    503: ("overloaded", "the service holds 1024 of 1024 images in flight; retry shortly"),
    504: ("timeout", "the request waited over 30s for the model; the service is overloaded "
          "or the timeout too short"),
}  # fmt: skip


def error_responses(
    *statuses: int, specific: dict[int, tuple[str, str, str]] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error statuses: always JSON, whatever
    the route's own media type (/metrics answers text, its 401 does not). `specific`
    gives a route's own (description, code, message) for a status."""
    descriptions = {
        400: "Undecodable image, bad base64, a bad embedding or a malformed body; the "
        "message names the item.",
        401: "API keys are configured and the request has none or a wrong one.",
        408: "The request body did not all arrive within CLIP_REQUEST_TIMEOUT_S; the "
        "connection is closed.",
        413: "Upload bytes, image pixels or images per request over the limit.",
        415: "Content type not taken by this endpoint.",
        422: "Well-formed request that fails validation.",
        503: "Overloaded or shutting down; retry after `Retry-After` seconds.",
        504: "The request waited past the request timeout.",
        500: "A fault on the server's side; never caused by what a client sent.",
    }
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        code, message = _EXAMPLES[status]
        description = descriptions[status]
        if specific and status in specific:
            description, code, message = specific[status]
        responses[status] = {
            "description": description,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/ErrorResponse"},
                    "example": error_body(code, message),
                }
            },
        }
    return responses
