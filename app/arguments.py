"""`python -m app`'s command line, in a module that imports nothing heavy: a usage error
is answered at once, not after the seconds of importing torch."""

from __future__ import annotations

import argparse


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app", description="Serve the CLIP re-ID embedding service."
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=_port, default=8000)
    return parser.parse_args(argv)


def _port(text: str) -> int:
    """A TCP port for argparse: out of range was a plain-text OverflowError from bind."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 0-65535 (0: any free port)")
    return port
