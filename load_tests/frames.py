"""Frames with boxes against crops: the same people sent two ways, in one run.

A 1920x1080 JPEG camera frame with 10 person boxes goes to /embed/frame; the same 10
boxes, cut out and JPEG-encoded as a client would, go to /embed/batch. Each way is driven
by C closed-loop clients for a fixed time; the report gives crops/s, latency, the bytes
on the wire per crop (request and response, headers included) and what cutting and
encoding the crops costs the client, which the frame route saves it.

    python -m load_tests.frames --model-dir models/vit-b-32-random --clients 1,4
    python -m load_tests.frames --url http://127.0.0.1:8000 --clients 4
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from app.tools.synthetic_people import make_person
from load_tests.concurrency import memory_mb, start_load_tool, start_server

FRAME_SIZE = (1920, 1080)
JPEG_QUALITY = 85


@dataclass(frozen=True)
class Scene:
    frame: bytes  # the camera's JPEG
    boxes: list[list[int]]
    crops: list[bytes]  # each box cut out and JPEG-encoded, as a client sends to /embed
    client_crop_ms: float  # cutting and encoding the crops, per frame, on this machine


@dataclass
class WayResult:
    way: str
    clients: int
    requests: int
    errors: int
    seconds: float
    crops_per_s: float
    p50_ms: float
    p95_ms: float
    request_bytes_per_crop: float
    response_bytes_per_crop: float


def make_scene(people: int = 10, seed: int = 0) -> Scene:
    """A street-like frame: a textured background with `people` synthetic people pasted
    at detector-like sizes (70-180 px wide), their boxes, and the client's crops of them."""
    rng = np.random.default_rng(seed)
    width, height = FRAME_SIZE
    coarse = rng.integers(40, 200, size=(height // 24, width // 24, 3), dtype=np.uint8)
    frame = Image.fromarray(coarse).resize(FRAME_SIZE, Image.Resampling.BICUBIC)
    boxes: list[list[int]] = []
    slot = width // people
    for index in range(people):
        person = Image.open(io.BytesIO(make_person(rng).jpeg)).convert("RGB")
        scale = rng.uniform(0.55, 1.4)
        person = person.resize((int(person.width * scale), int(person.height * scale)))
        x = index * slot + int(rng.integers(0, max(1, slot - person.width)))
        y = int(rng.integers(height // 3, height - person.height))
        frame.paste(person, (x, y))
        boxes.append([x, y, x + person.width, y + person.height])
    buffer = io.BytesIO()
    frame.save(buffer, "JPEG", quality=JPEG_QUALITY)
    camera_jpeg = buffer.getvalue()

    decoded = Image.open(io.BytesIO(camera_jpeg)).convert("RGB")
    began = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        crops = []
        for box in boxes:
            out = io.BytesIO()
            x1, y1, x2, y2 = box
            decoded.crop((x1, y1, x2, y2)).save(out, "JPEG", quality=JPEG_QUALITY)
            crops.append(out.getvalue())
    crop_ms = 1000 * (time.perf_counter() - began) / repeats
    return Scene(camera_jpeg, boxes, crops, crop_ms)


def _request(client: httpx.AsyncClient, way: str, scene: Scene) -> httpx.Request:
    if way == "frame":
        return client.build_request(
            "POST",
            "/embed/frame",
            files={"image": ("frame.jpg", scene.frame, "image/jpeg")},
            data={"boxes": json.dumps(scene.boxes)},
        )
    files = [("images", (f"{i}.jpg", c, "image/jpeg")) for i, c in enumerate(scene.crops)]
    return client.build_request("POST", "/embed/batch", files=files)


def _wire_bytes(request: httpx.Request) -> int:
    head = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
    headers = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    return len(head) + len(headers) + 2 + len(request.content)


@dataclass
class _Tally:
    latencies: list[float]
    errors: int = 0
    sent: int = 0
    received: int = 0
    seconds: float = 0.0


async def drive(url: str, way: str, clients: int, seconds: float, scene: Scene) -> _Tally:
    """`clients` closed loops posting `way` for `seconds`."""
    tally = _Tally([])
    deadline = time.perf_counter() + seconds

    async def loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            request = _request(client, way, scene)
            request.read()  # the multipart body as bytes: counted, then sent as is
            started = time.perf_counter()
            response = await client.send(request)
            if response.status_code != 200:
                tally.errors += 1
                continue
            tally.latencies.append(time.perf_counter() - started)
            tally.sent += _wire_bytes(request)
            tally.received += len(response.content) + sum(
                len(k) + len(v) + 4 for k, v in response.headers.raw
            )

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        began = time.perf_counter()
        await asyncio.gather(*(loop(client) for _ in range(clients)))
        tally.seconds = time.perf_counter() - began
    return tally


def summarize(way: str, clients: int, tallies: list[_Tally], boxes: int) -> WayResult:
    latencies = sorted(latency for t in tallies for latency in t.latencies) or [float("nan")]
    requests = sum(len(t.latencies) for t in tallies)
    seconds = sum(t.seconds for t in tallies)
    crops = requests * boxes
    return WayResult(
        way=way,
        clients=clients,
        requests=requests,
        errors=sum(t.errors for t in tallies),
        seconds=seconds,
        crops_per_s=crops / seconds,
        p50_ms=1000 * statistics.median(latencies),
        p95_ms=1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        request_bytes_per_crop=sum(t.sent for t in tallies) / max(crops, 1),
        response_bytes_per_crop=sum(t.received for t in tallies) / max(crops, 1),
    )


def main(argv: list[str] | None = None) -> list[WayResult]:
    start_load_tool()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="drive a running service")
    target.add_argument("--model-dir", help="start the service on this local-dir model")
    parser.add_argument("--clients", default="1,4", help="comma-separated client counts")
    parser.add_argument("--people", type=int, default=10, help="boxes per frame")
    parser.add_argument("--seconds", type=float, default=20.0, help="per way and client count")
    parser.add_argument(
        "--slices",
        type=int,
        default=5,
        help="alternate the two ways this many times per client count, so that the "
        "machine's drift falls on both alike",
    )
    parser.add_argument("--precision", default="auto", help="CLIP_PRECISION of the service")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    scene = make_scene(args.people)

    server = None
    if args.model_dir:
        server = start_server(args.model_dir, args.port, {"CLIP_PRECISION": args.precision})
    url = args.url or f"http://127.0.0.1:{args.port}"
    results: list[WayResult] = []
    try:
        info = httpx.get(f"{url}/info", timeout=10).json()
        print(f"service: {info['model']} on {info['device']} ({info['precision']})")
        print(
            f"scene: {FRAME_SIZE[0]}x{FRAME_SIZE[1]} JPEG of {len(scene.frame):,} bytes, "
            f"{len(scene.boxes)} boxes; the crops as JPEGs: "
            f"{sum(len(c) for c in scene.crops):,} bytes; cutting and encoding them costs "
            f"the client {scene.client_crop_ms:.1f} ms per frame"
        )
        for way in ("frame", "batch"):  # warm both paths up
            asyncio.run(drive(url, way, max(counts), 2.0, scene))
        slice_s = args.seconds / max(1, args.slices)
        for count in counts:
            tallies: dict[str, list[_Tally]] = {"frame": [], "batch": []}
            for _ in range(max(1, args.slices)):
                for way, kept in tallies.items():
                    kept.append(asyncio.run(drive(url, way, count, slice_s, scene)))
            for way, kept in tallies.items():
                results.append(summarize(way, count, kept, len(scene.boxes)))
        if server is not None:
            steady, peak = memory_mb(server.pid)
            print(f"service memory: steady {steady:.0f} MB, peak {peak:.0f} MB")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    print(
        "\n| way | clients | requests | errors | crops/s | p50 ms | p95 ms "
        "| request bytes/crop | response bytes/crop |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        name = (
            f"/embed/frame ({len(scene.boxes)} boxes)"
            if r.way == "frame"
            else f"/embed/batch ({len(scene.boxes)} crops)"
        )
        print(
            f"| {name} | {r.clients} | {r.requests} | {r.errors} | {r.crops_per_s:.1f} | "
            f"{r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.request_bytes_per_crop:,.0f} | "
            f"{r.response_bytes_per_crop:,.0f} |"
        )
    for count in counts:
        frame = next(r for r in results if r.way == "frame" and r.clients == count)
        batch = next(r for r in results if r.way == "batch" and r.clients == count)
        speed = frame.crops_per_s / batch.crops_per_s
        wire = frame.request_bytes_per_crop / batch.request_bytes_per_crop
        print(f"{count} client(s): frame / batch: crops/s {speed:.2f}x, request bytes {wire:.2f}x")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results


if __name__ == "__main__":
    main()
