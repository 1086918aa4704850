"""Container health probe: exit 0 when the service answers 200 on a path, 1 otherwise.

`python -m app.tools.healthcheck [/health|/ready] [--port 8000]`. The image's HEALTHCHECK and
docker-compose.yml call this module instead of an inline `python -c "..."` because some
engines' Docker-compatible APIs (podman 4.3's) split a healthcheck's arguments on spaces,
which breaks any inline program; a module name has none.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def probe(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="/health", choices=["/health", "/ready"])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    args = parser.parse_args(argv)
    healthy = probe(f"http://127.0.0.1:{args.port}{args.path}", args.timeout)
    if not healthy:
        print(f"{args.path} did not answer 200", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
