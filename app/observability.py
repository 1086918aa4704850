"""Prometheus metrics, request ids and one structured log line per request.

Each app owns its registry, so several apps in one process (tests) never share counters.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("app.access")
logger = logging.getLogger("app")
# Listening, ready, draining, stopped: a few lines a lifetime, which CLIP_LOG_LEVEL=warning
# keeps (the ready line says what runs and whether callers need a key).
lifecycle_log = logging.getLogger("app.lifecycle")

# The id of the request being served, for every log line written on its behalf: set by
# the middleware, copied into worker threads with the context (see inference.service).
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id_for(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-ID where it sent one that is safe to echo and log; a new
    one otherwise. (Two ids: which one a proxy or a log keeps differs, so neither is
    this request's.) `headers` as ASGI gives them: names in lower case."""
    sent = [value for name, value in headers if name == b"x-request-id"]
    incoming = sent[0].decode("latin-1") if len(sent) == 1 else ""
    return incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    queue_seconds: Histogram
    forward_seconds: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    images_in_flight: Gauge
    model_info: Gauge
    pixels_in_flight: Gauge
    rejections: Counter

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter(
                "clip_requests", "HTTP requests by endpoint and status.",
                ["endpoint", "status"], registry=registry,
            ),
            request_seconds=Histogram(
                "clip_request_duration_seconds", "Time from request to response.",
                ["endpoint"], buckets=_LATENCY_BUCKETS, registry=registry,
            ),
            queue_seconds=Histogram(
                "clip_queue_wait_seconds", "Time an image waited in the batcher's queue.",
                buckets=_LATENCY_BUCKETS, registry=registry,
            ),
            forward_seconds=Histogram(
                "clip_forward_seconds", "Duration of one forward pass.",
                buckets=_LATENCY_BUCKETS, registry=registry,
            ),
            batch_size=Histogram(
                "clip_batch_size", "Images per forward pass.",
                buckets=_BATCH_BUCKETS, registry=registry,
            ),
            queue_depth=Gauge(
                "clip_queue_depth", "Images waiting for a forward pass.", registry=registry
            ),
            images_in_flight=Gauge(
                "clip_images_in_flight",
                "Images admitted and not yet answered (bounded by CLIP_MAX_QUEUE).",
                registry=registry,
            ),
            model_info=Gauge(
                "clip_model_info", "The model being served: 1, with what runs it as labels.",
                ["model", "backend", "precision", "device"], registry=registry,
            ),
            pixels_in_flight=Gauge(
                "clip_pixels_in_flight",
                "Decoded pixels admitted and not yet answered (CLIP_MAX_PIXELS_IN_FLIGHT).",
                registry=registry,
            ),
            rejections=Counter(
                "clip_rejections", "Requests refused, by error code.",
                ["reason"], registry=registry,
            ),
        )  # fmt: skip

    def observe_batch(self, size: int, queue_waits: list[float], forward_s: float) -> None:
        self.batch_size.observe(size)
        self.forward_seconds.observe(forward_s)
        for wait in queue_waits:
            self.queue_seconds.observe(wait)


class RequestObservability:
    """Pure ASGI middleware: request id in and out, metrics, one JSON access line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._paths: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_for(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # A bug, not a client's doing: one traceback, and a JSON 500 that carries
            # the request id (Starlette's own last-resort handler sits outside us and
            # would answer without it). Not re-raised: the server would log it again.
            logger.exception("unhandled error")
            self.metrics.rejections.labels("internal_error").inc()
            if not response_started:
                body = json.dumps(
                    {
                        "error": {
                            "code": "internal_error",
                            "message": "internal error; the operator's log has the details "
                            f"(request id {request_id})",
                        }
                    }
                ).encode()
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            request_id_var.reset(token)
            elapsed = time.perf_counter() - started
            endpoint = self._endpoint(scope)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(elapsed)
            access_log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "endpoint": endpoint,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "client": (scope.get("client") or ("-",))[0],
                },
            )

    def _endpoint(self, scope: Scope) -> str:
        # The route template, never the raw path: unknown paths must not mint new series.
        # Starlette leaves the matched route in the scope. A request refused before
        # routing (413 by its Content-Length, 415 by its coding, 503 at the concurrency
        # bound) has none, and is counted under its path if that is one of the app's:
        # the routes here have no path parameters. 404s are "other".
        route = scope.get("route")
        if route is not None:
            return str(getattr(route, "path", "other"))
        if self._paths is None and "app" in scope:
            # FastAPI nests included routers in objects without a path; its schema (built
            # once, then cached) lists every API path.
            app = scope["app"]
            top_level = {str(path) for r in app.routes if (path := getattr(r, "path", None))}
            self._paths = frozenset(top_level | set(app.openapi().get("paths", {})))
        path = scope.get("path", "")
        return path if self._paths and path in self._paths else "other"


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request it was written for, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        # A signal's handler runs in whatever context the loop was in: a lifecycle line
        # (draining) took the id of the request that happened to be running.
        if record.name != lifecycle_log.name and not hasattr(record, "request_id"):
            request_id = request_id_var.get()
            if request_id is not None:
                record.request_id = request_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log shippers (Loki, Elastic, CloudWatch) parse."""

    _STANDARD = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        document.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def _not_uvicorn_invalid_request(record: logging.LogRecord) -> bool:
    return record.getMessage() != "Invalid HTTP request received."


def _not_no_cuda_runtime(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No CUDA runtime is found")


def set_log_level(level: str) -> None:
    """The service's own log (access lines included) at `level` and above, but its
    lifecycle lines down to `warning`; libraries' stay at WARNING, and uvicorn's own
    (plain text under bare uvicorn) go quiet with the service's."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    logging.getLogger("app").setLevel(numeric)
    lifecycle_log.setLevel(logging.INFO if numeric == logging.WARNING else numeric)
    if numeric > logging.INFO:
        for name in ("uvicorn", "uvicorn.error"):
            logging.getLogger(name).setLevel(numeric)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)  # open_clip narrates every step at INFO on the root
    logging.getLogger("app").setLevel(level)
    logging.getLogger("uvicorn.access").disabled = True  # ours carries the request id
    # Libraries' warnings (torch's FutureWarnings while converting) as JSON lines too,
    # not plain text in the middle of the stream.
    logging.captureWarnings(True)
    # torch gives its loggers a plain-text handler of its own (glog's format), which
    # wrote lines like "W1206 ... No CUDA runtime is found" into the JSON stream.
    for name in list(logging.root.manager.loggerDict):
        if name == "torch" or name.startswith("torch."):
            torch_logger = logging.getLogger(name)
            if torch_logger.handlers:
                torch_logger.handlers = [handler]
    # uvicorn warns of every request its parser stops, before the service's protocol
    # answers it (431, 400) and logs that answer: one line is enough.
    logging.getLogger("uvicorn.error").addFilter(_not_uvicorn_invalid_request)
    # torch's extension builder, which NNCF imports for OpenVINO's int8 conversion, warns
    # on every host without CUDA that no CUDA runtime is found: nothing this service
    # builds or needs, and an operator of a CPU host took it for a fault.
    logging.getLogger("torch.utils.cpp_extension").addFilter(_not_no_cuda_runtime)
    # The multipart parser warns of each malformed body it is given ("Expected boundary
    # character ..."): the client's mistake, answered with a 400 and logged at INFO as
    # every refusal is; at WARNING a client could fill the log with them.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
