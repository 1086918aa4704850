"""Soak: mixed valid and invalid traffic against the service for a set time.

Reports requests served, responses by status, requests that got no response, and the
service's resident memory after warm-up and at the end (plus samples in between), so a
leak shows as growth. Bounded in time; loopback only.

    python -m load_tests.soak --model-dir models/vit-b-32-random --minutes 10
    python -m load_tests.soak --url http://127.0.0.1:8000 --pid 1234 --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import random
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from load_tests.concurrency import make_crops, memory_mb, start_load_tool, start_server


def flat_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 160)).save(buffer, "PNG")
    return buffer.getvalue()


def hostile_mix() -> list[tuple[str, str, dict[str, object]]]:
    """Inputs that cost far more than their bytes (issue 10): 40 Mpx slivers, a batch of
    64 flat 40 Mpx PNGs, searches past the product limits."""
    sliver, tall, tile = flat_png(40, 1_000_000), flat_png(1000, 40_000), flat_png(6000, 6600)
    unit = base64.b64encode(np.full(512, 512**-0.5, dtype="<f4").tobytes()).decode()
    return [
        ("POST", "/analyze", {"files": {"image": ("s.png", sliver)}}),
        ("POST", "/embed", {"files": {"image": ("s.png", sliver)}}),
        ("POST", "/analyze", {"files": {"image": ("t.png", tall)}}),
        ("POST", "/embed/batch", {"files": [("images", ("f.png", tile))] * 64}),  # 413
        ("POST", "/similarity", {"json": {"queries": [unit] * 1000, "gallery": [unit] * 1000,
                                          "top_k": 1000}}),  # 413: queries x top_k
        ("POST", "/similarity", {"json": {"queries": [unit] * 100, "gallery": [unit] * 2000,
                                          "top_k": 100}}),
    ]  # fmt: skip


def request_mix(crops: list[bytes], dim: int) -> list[tuple[str, str, dict[str, object]]]:
    """(method, path, httpx kwargs): mostly valid work, plus every kind of bad input.
    `dim` is the service's: /similarity refuses embeddings of any other length."""
    good = crops[0]
    b64 = base64.b64encode(good).decode()
    vector = base64.b64encode(np.full(dim, dim**-0.5, dtype="<f4").tobytes()).decode()
    as_json = {"content-type": "application/json"}
    return [
        ("POST", "/embed", {"files": {"image": ("a.jpg", good)}}),
        ("POST", "/embed", {"files": {"image": ("b.jpg", crops[1])}}),
        ("POST", "/embed", {"json": {"image": b64}}),
        ("POST", "/embed/batch", {"files": [("images", ("c.jpg", c)) for c in crops[:4]]}),
        ("POST", "/analyze", {"files": {"image": ("d.jpg", crops[2])}}),
        ("POST", "/analyze", {"files": {"image": ("d.jpg", crops[3])},
                              "data": {"include_embedding": "true"}}),
        ("POST", "/similarity", {"json": {"a": vector, "b": vector}}),
        ("POST", "/embed", {"files": {"image": ("e.jpg", good[: len(good) // 3])}}),  # truncated
        ("POST", "/embed", {"files": {"image": ("f.txt", b"not an image at all")}}),
        ("POST", "/embed", {"json": {"image": "%%% not base64"}}),
        ("POST", "/embed", {"content": b"{broken", "headers": as_json}),
        ("POST", "/embed", {"content": good, "headers": {"content-type": "image/jpeg"}}),
        ("POST", "/similarity", {"json": {"a": "AAAA", "b": vector}}),  # 400: 3 bytes
        ("POST", "/similarity", {"json": {"a": vector[:16], "b": vector}}),  # 422: 3 values
        ("GET", "/no/such/path", {}),
        ("GET", "/health", {}),
    ]  # fmt: skip


async def soak(
    url: str, pid: int | None, seconds: float, clients: int, sample_s: float, hostile: bool
) -> dict:
    crops = make_crops(8)
    async with httpx.AsyncClient(base_url=url, timeout=10) as probe:
        try:
            dim = int((await probe.get("/info")).json()["dim"])
        except httpx.TransportError as exc:
            raise SystemExit(f"no CLIP service answers at {url}: {exc}") from None
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"{url}/info is not this service's (no 'dim' in it)") from None
    mix = request_mix(crops, dim) + (hostile_mix() if hostile else [])
    statuses: collections.Counter[str] = collections.Counter()
    health_ms: list[float] = []
    retried: collections.Counter[str] = collections.Counter()
    memory: list[tuple[float, float]] = []
    deadline = time.monotonic() + seconds
    began = time.monotonic()

    async def client_loop(seed: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            method, path, kwargs = rng.choice(mix)
            try:
                started = time.perf_counter()
                response = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
                # As app.client does: a 503 with Retry-After is retried, 3 times at most;
                # one still refused after that counts as a 503.
                for _ in range(3):
                    if response.status_code != 503 or "retry-after" not in response.headers:
                        break
                    retried["503 retried"] += 1
                    await asyncio.sleep(min(5.0, float(response.headers["retry-after"])))
                    response = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
                statuses[str(response.status_code)] += 1
                if path == "/health":
                    health_ms.append(1000 * (time.perf_counter() - started))
            except httpx.HTTPError as exc:
                statuses[f"no response ({type(exc).__name__})"] += 1

    async def sampler() -> None:
        while pid is not None and time.monotonic() < deadline:
            memory.append((round(time.monotonic() - began), memory_mb(pid)[0]))
            await asyncio.sleep(sample_s)

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(sampler(), *(client_loop(i, client) for i in range(clients)))
        healthy = (await client.get("/health")).status_code == 200
    # Resident memory once the last requests are answered: what the service keeps, not
    # the transient peak of a 40 Mpx decode that a sample may happen to catch.
    await asyncio.sleep(2)
    idle_mb = memory_mb(pid)[0] if pid is not None else None
    return {
        "seconds": round(time.monotonic() - began, 1),
        "requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "retries": dict(retried),
        "health_after": healthy,
        "health_ms": {
            "p50": round(float(np.percentile(health_ms, 50)), 1) if health_ms else None,
            "max": round(max(health_ms), 1) if health_ms else None,
        },
        "memory_mb": memory,
        "idle_mb": idle_mb,
    }


def main(argv: list[str] | None = None) -> None:
    start_load_tool()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running service (give --pid for its memory)")
    target.add_argument("--model-dir", help="start the service on this local-dir model")
    parser.add_argument("--pid", type=int, help="the running service's process id")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--no-hostile", action="store_true", help="leave out the costly-shape inputs"
    )
    args = parser.parse_args(argv)

    server = start_server(args.model_dir, args.port, {}) if args.model_dir else None
    url = args.url or f"http://127.0.0.1:{args.port}"
    pid = server.pid if server is not None else args.pid
    try:
        hostile = not args.no_hostile
        warmup = asyncio.run(soak(url, pid, args.warmup_s, args.clients, 10, hostile))
        report = asyncio.run(soak(url, pid, args.minutes * 60, args.clients, 15, hostile))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    print(f"{report['requests']} requests in {report['seconds']} s, by status:")
    for status, count in report["statuses"].items():
        print(f"  {status}: {count}")
    print(f"  (503s retried after Retry-After, not counted above: {report['retries']})")
    print(f"/health afterwards: {'200' if report['health_after'] else 'FAILED'}")
    print(f"/health latency during the soak (ms): {report['health_ms']}")
    if report["idle_mb"] and warmup["idle_mb"]:
        start, end = warmup["idle_mb"], report["idle_mb"]
        print(
            f"service RSS at rest after warm-up {start:.0f} MB, at rest after the soak "
            f"{end:.0f} MB ({100 * (end - start) / start:+.1f} %)"
        )
    if report["memory_mb"]:
        start, end = report["memory_mb"][0][1], report["memory_mb"][-1][1]
        peak = max(m for _, m in report["memory_mb"])
        print(
            f"service RSS sampled under load: first {start:.0f} MB, last {end:.0f} MB "
            f"({100 * (end - start) / start:+.1f} %), highest {peak:.0f} MB"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
