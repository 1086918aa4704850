"""SIGTERM or SIGINT before the server is up: exit 0 at once, with one JSON log line.

`python -m app` spends its first seconds importing torch, open_clip and the runtimes,
before any of its own handlers exist. A signal then used to end it the default way:
SIGTERM with status 143 and nothing in the log, SIGINT with a plain-text
KeyboardInterrupt traceback in the middle of the JSON stream. Nothing is served or
written yet, so the graceful answer is simply to go. Standard library only: this runs
before the imports it guards.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from types import FrameType

# The signals that stop the service, whichever handler holds them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _exit_now(signum: int, frame: FrameType | None) -> None:
    line = {
        "ts": round(time.time(), 3),
        "level": "info",
        "logger": "app",
        "message": f"{signal.Signals(signum).name} while the server is not running: exiting now",
    }
    try:
        sys.stderr.write(json.dumps(line) + "\n")
        sys.stderr.flush()
    finally:
        os._exit(0)  # not SystemExit: an import half done must not run its cleanup


def exit_at_once_on_signals() -> None:
    """Until the server installs its own (app.server.GracefulServer.capture_signals),
    and again once it has stopped and puts these back."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _exit_now)
