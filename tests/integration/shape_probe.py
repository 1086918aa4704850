"""Run in a subprocess by test_hostile_shapes: post each image file to the app and report,
per request, its status, seconds, and how far the process's peak memory rose above what
it held before the request (Linux resets the peak when 5 is written to clear_refs).

    python -m tests.integration.shape_probe MODEL_DIR RESIZE_MODE PATH:ENDPOINT ...
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

from app.config import Settings
from app.main import create_app


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def probe(model_dir: str, resize_mode: str, jobs: list[tuple[Path, str]]) -> list[dict]:
    settings = Settings(
        model=f"local-dir:{model_dir}", device="cpu", precision="fp32", resize_mode=resize_mode
    )
    app = create_app(settings)
    results = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
            for path, endpoint in jobs:
                data = path.read_bytes()
                _reset_peak()
                before = _status_kb("VmRSS")
                started = time.perf_counter()
                response = await client.post(endpoint, files={"image": (path.name, data)})
                results.append(
                    {
                        "file": path.name,
                        "endpoint": endpoint,
                        "status": response.status_code,
                        "seconds": round(time.perf_counter() - started, 3),
                        "peak_rise_mb": round((_status_kb("VmHWM") - before) / 1024, 1),
                    }
                )
    return results


def main() -> None:
    model_dir, resize_mode, *specs = sys.argv[1:]
    jobs = [(Path(spec.rsplit(":", 1)[0]), spec.rsplit(":", 1)[1]) for spec in specs]
    print(json.dumps(asyncio.run(probe(model_dir, resize_mode, jobs))))


if __name__ == "__main__":
    main()
