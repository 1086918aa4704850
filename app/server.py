"""The production server behind `python -m app`: uvicorn with a graceful SIGTERM.

On SIGTERM (or SIGINT) the service stops admitting work at once (uvicorn closes the
listening socket and idle connections; a request inside the app that has not reached the
model yet answers 503 with Retry-After), lets requests in flight finish within
CLIP_REQUEST_TIMEOUT_S, drains or fails what the batcher holds, and exits 0 — an
orchestrator reads anything else as a crash. A second signal exits at once, each request
still in flight answered a JSON 503, with 128 + the signal: work was dropped.
(`uvicorn app.main:app` serves the same app, but re-raises the signal after shutting
down, so its exit status is -15.)

    python -m app --host 0.0.0.0 --port 8000

The port opens before the model loads: until it is loaded and warmed up, /health answers
200 and every other request a JSON 503 `not_ready` (app.api.loading); SIGTERM then exits
at once, 0, as there is nothing to drain.

A startup failure of a known cause (bad settings, weights that cannot be had) is logged
as one line naming the setting to change, with no traceback, and the process exits
non-zero: 1 for settings, 3 for the model or a port already in use (as uvicorn reports a
failed startup).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Generator
from contextlib import contextmanager
from functools import partial
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import SettingsError

from app.api.errors import missing_endpoint
from app.api.loading import answer_while_loading
from app.api.transport import (
    HeaderDeadlineProtocol,
    connection_limit,
    header_deadline_protocol,
)
from app.config import MisspeltApiKeys, Settings, load_settings
from app.early_exit import STOP_SIGNALS
from app.errors import ShuttingDown
from app.inference.conversion_cache import remove_temporary
from app.main import create_app
from app.observability import configure_logging, lifecycle_log, set_log_level

# Longest a request's line and headers may take to arrive (nginx's client_header_timeout
# is 60 s; a camera or a load balancer sends them in one packet).
HEADER_TIMEOUT_S = 10.0

logger = logging.getLogger("app")
# How long a forced exit waits for the loop to answer the requests in flight.
_FORCED_EXIT_S = 2.0
FORCED_EXIT = (
    b"503 Service Unavailable",
    ShuttingDown.code,
    "the service was stopped before this request finished; retry on another replica",
)


def _what_to_do(host: str) -> str:
    """What to change when the listening socket could not be bound: uvicorn logs only
    the OSError, and 'address already in use' is not the only way to get there."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    except OSError:
        return f"this machine cannot resolve {host!r} to an address; fix --host"
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)  # port 0: any free port, so only the host is tested
    except OSError:
        return (
            f"{host!r} is not an address of this machine; use one of its own with --host "
            "(0.0.0.0 for every interface)"
        )
    return "stop what holds the port, or choose another with --port (below 1024 needs privileges)"


def _exit_at_once(status: int) -> None:
    """Exit without Python's cleanup (a load thread cannot be stopped; requests in flight
    are already answered), removing what a conversion left for this run only (an
    unwritable cache) and with the log flushed."""
    remove_temporary()
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(status)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, header_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._header_timeout_s = header_timeout_s
        self._loading = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loading:
            # Nothing is served yet, and the load runs in a thread that cannot be
            # stopped: waiting for it took a cold int8 conversion's 67 s, past any
            # orchestrator's grace period (then SIGKILL). What a conversion leaves
            # half-written is in a staging folder, never in the cache.
            lifecycle_log.info("%s while the model loads: exiting now", signal.Signals(sig).name)
            _exit_at_once(0)
        if self.should_exit and self._loop is not None:  # a second signal: exit now
            # On the loop, not in this handler, which may have interrupted a write; and
            # whatever the loop is doing, out within a moment.
            threading.Timer(_FORCED_EXIT_S, os._exit, (128 + sig,)).start()
            self._loop.call_soon_threadsafe(self._exit_now, sig)
            return
        lifecycle_log.info(
            "%s: draining, no new work; requests in flight have up to %d s (a second "
            "signal exits at once)",
            signal.Signals(sig).name,
            self.config.timeout_graceful_shutdown,
        )
        self._app.state.draining = True  # refuse new work before anything else
        super().handle_exit(sig, frame)

    def _exit_now(self, sig: int) -> None:
        """Answer every request in flight with a JSON 503 and exit 128 + sig, as a shell
        reports a process its signal ended: uvicorn's forced exit cancelled them instead,
        each a plain-text 500 and a 70-line traceback, and the process exited 0."""
        answered = 0
        for connection in list(self.server_state.connections):
            if isinstance(connection, HeaderDeadlineProtocol):
                answered += connection.abandon(
                    *FORCED_EXIT, retry_after_s=ShuttingDown.retry_after_s
                )
            else:
                connection.shutdown()
        logger.warning(
            "a second %s: exiting now; %d request(s) in flight answered 503 shutting_down",
            signal.Signals(sig).name,
            answered,
        )
        _exit_at_once(128 + sig)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        config = self.config
        if sockets is not None or config.fd is not None or config.uds is not None:
            await super().startup(sockets)  # not how this entry point is run
            return
        # Listen before the lifespan loads the model, answering 503 meanwhile; the app's
        # server takes the same socket over once the lifespan is done (app.api.loading).
        try:
            listener = config.bind_socket()
        except SystemExit:  # uvicorn has logged the OSError alone, no address
            logger.error(
                "cannot listen on %s:%d: %s", config.host, config.port, _what_to_do(config.host)
            )
            raise
        loading = await answer_while_loading(
            listener,
            self._header_timeout_s,
            partial(count_refusal, self._app),
            config.backlog,
            on_health=partial(count_health, self._app),
            missing_endpoint=partial(missing_endpoint, self._app),
        )
        host, port = listener.getsockname()[:2]
        lifecycle_log.info(
            "listening on %s:%d while the model loads: /ready answers 503 until it is ready",
            host,
            port,
        )
        lifespan_startup = self.lifespan.startup

        def app_protocol() -> asyncio.Protocol:  # as uvicorn makes them
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        async def lifespan_then_hand_over() -> None:
            self._loading = True
            try:
                await lifespan_startup()
            except BaseException:
                loading.close()
                raise
            finally:
                self._loading = False
            if self.lifespan.should_exit:  # the startup failed; uvicorn exits next
                loading.close()
                return
            # Before uvicorn accepts on the socket; a request still arriving moves to
            # the app with its bytes, so none gets a 503 once the model is ready.
            adopted = loading.hand_over(app_protocol)
            if adopted:
                logger.info("%d connection(s) opened while loading passed to the app", adopted)

        # uvicorn runs the lifespan and then listens, within one method: this is the
        # one place between the two.
        self.lifespan.startup = lifespan_then_hand_over
        await super().startup([listener])

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn's own version re-raises the signal after shutdown; we exit 0 instead.
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(app: FastAPI, settings: Settings, host: str, port: int) -> int:
    """Run `app` under uvicorn with the production limits until SIGTERM; the exit status."""
    header_timeout_s = min(HEADER_TIMEOUT_S, settings.request_timeout_s)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # configure_logging's JSON lines
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        # The service's own JSON 503 refuses work past CLIP_MAX_CONCURRENT_REQUESTS, and
        # lets GETs pass; uvicorn's plain-text one, which counts idle connections too and
        # refuses /health as well, only guards the file descriptors.
        limit_concurrency=connection_limit(),
        http=header_deadline_protocol(header_timeout_s, partial(count_refusal, app)),
        backlog=2048,
        timeout_keep_alive=15,  # above typical client pools' idle time, below LB's 60 s
    )
    server = GracefulServer(config, app, header_timeout_s)
    server.run()
    if not server.started:
        return 3  # startup failed, as uvicorn reports it
    lifecycle_log.info("stopped")  # an operator reads a clean stop in the log, not only exit 0
    return 0


def count_refusal(app: FastAPI, status: int, code: str, endpoint: str = "other") -> None:
    """A connection answered below the app (headers too slow, not HTTP; the model still
    loading), in its metrics, under the endpoint it named ("other" where none)."""
    metrics = app.state.metrics
    metrics.requests.labels(endpoint, str(status)).inc()
    metrics.rejections.labels(code).inc()


def count_health(app: FastAPI, seconds: float) -> None:
    """A /health answered while the model loads, in the app's request count and
    durations: a dashboard of liveness probes otherwise starts only once the model is
    ready."""
    app.state.metrics.requests.labels("/health", "200").inc()
    app.state.metrics.request_seconds.labels("/health").observe(seconds)


def main(args: argparse.Namespace) -> int:
    configure_logging()
    try:
        settings = load_settings()
    except ValidationError as exc:
        logger.error("invalid settings: %s", describe_invalid_settings(exc))
        return 1  # what the uncaught error exited with before
    except (SettingsError, MisspeltApiKeys) as exc:  # SettingsError: a value not even parsed
        logger.error("invalid settings: %s", exc)
        return 1
    set_log_level(settings.log_level)
    return serve(create_app(settings), settings, args.host, args.port)


def describe_invalid_settings(error: ValidationError) -> str:
    """Every problem, by environment variable, in one line, with the value given where
    it is short text (quoted, so that a stray space shows); never an API key's."""
    problems = []
    for detail in error.errors(include_url=False):
        # Field problems are located by field name; the cross-field checks' messages
        # name their variables themselves.
        message = detail["msg"].removeprefix("Value error, ")
        if detail["loc"]:
            field, *item = detail["loc"]
            variable = f"CLIP_{str(field).upper()}"
            if variable not in message:  # `CLIP_REGION_BOUNDS[1]: ...` for a list's item
                message = f"{variable}{''.join(f'[{i}]' for i in item)}: {message}"
            given = detail.get("input")
            if field != "api_keys" and isinstance(given, str) and len(given) <= 64:
                message += f" (got {given!r})"
        problems.append(message)
    return "; ".join(dict.fromkeys(problems))
