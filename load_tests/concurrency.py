"""Closed-loop load: C concurrent clients posting single 128x256 JPEG crops.

Starts the service itself (or drives one at --url), runs each client count for a fixed
time, and prints images/s and latency percentiles, the in-process ceiling of the same
model and precision, and the ratios between them. Bounded in time; loopback only.

    python -m load_tests.concurrency --model-dir models/vit-b-32-random --clients 1,16
    python -m load_tests.concurrency --url http://127.0.0.1:8000 --clients 1,4,16
    python -m load_tests.concurrency --model-dir models/vit-b-32-random --endpoints embed,analyze
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image


@dataclass
class LoadResult:
    endpoint: str
    clients: int
    requests: int
    errors: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    client_cpu_pct: float = float("nan")  # of one core, all client processes together


def make_crops(count: int, size: tuple[int, int] = (128, 256)) -> list[bytes]:
    """Person-crop-sized JPEGs with distinct content, like a detector's output."""
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(16, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        crops.append(buffer.getvalue())
    return crops


async def _drive(
    url: str,
    clients: int,
    seconds: float,
    crops: list[bytes],
    endpoint: str,
    batch_images: int,
    first_worker: int = 0,
) -> tuple[list[float], int, float]:
    """(latencies of the 200s, non-200 count, elapsed seconds) of `clients` closed loops."""
    latencies: list[float] = []
    errors = 0
    per_request = batch_images if endpoint == "batch" else 1
    deadline = time.perf_counter() + seconds

    async def client_loop(worker: int, client: httpx.AsyncClient) -> None:
        nonlocal errors
        index = worker
        while time.perf_counter() < deadline:
            chosen = [crops[(index + i) % len(crops)] for i in range(per_request)]
            index += clients
            started = time.perf_counter()
            if endpoint == "batch":
                files = [("images", (f"{i}.jpg", c, "image/jpeg")) for i, c in enumerate(chosen)]
                response = await client.post("/embed/batch", files=files)
            else:
                image = {"image": ("crop.jpg", chosen[0], "image/jpeg")}
                response = await client.post(f"/{endpoint}", files=image)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        began = time.perf_counter()
        workers = range(first_worker, first_worker + clients)
        await asyncio.gather(*(client_loop(w, client) for w in workers))
        elapsed = time.perf_counter() - began
    return latencies, errors, elapsed


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _drive_in_process(arguments: tuple[Any, ...]) -> tuple[list[float], int, float, float]:
    """One client process's share of the load (multiprocessing target)."""
    before = _cpu_seconds()
    latencies, errors, elapsed = asyncio.run(_drive(*arguments))
    return latencies, errors, elapsed, _cpu_seconds() - before


def _summarize(
    endpoint: str,
    clients: int,
    per_request: int,
    latencies: list[float],
    errors: int,
    elapsed: float,
    client_cpu_s: float,
) -> LoadResult:
    ordered = sorted(latencies) or [float("nan")]

    def percentile(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return LoadResult(
        endpoint=endpoint,
        clients=clients,
        requests=len(latencies),
        errors=errors,
        seconds=elapsed,
        images_per_s=len(latencies) * per_request / elapsed,
        p50_ms=1000 * statistics.median(ordered),
        p95_ms=percentile(0.95),
        p99_ms=percentile(0.99),
        client_cpu_pct=100 * client_cpu_s / elapsed,
    )


async def run_load(
    url: str,
    clients: int,
    seconds: float,
    crops: list[bytes],
    endpoint: str = "embed",
    batch_images: int = 32,
) -> LoadResult:
    """`endpoint` is embed, analyze (one crop per request) or batch (/embed/batch with
    `batch_images` crops per request). Throughput counts crops."""
    before = _cpu_seconds()
    latencies, errors, elapsed = await _drive(url, clients, seconds, crops, endpoint, batch_images)
    per_request = batch_images if endpoint == "batch" else 1
    cpu = _cpu_seconds() - before
    return _summarize(endpoint, clients, per_request, latencies, errors, elapsed, cpu)


def run_load_in_processes(
    url: str,
    clients: int,
    seconds: float,
    crops: list[bytes],
    endpoint: str,
    batch_images: int,
    processes: int,
) -> LoadResult:
    """run_load with the clients spread over `processes` client processes: one Python
    process tops out at a few hundred requests/s, below what a GPU host serves."""
    processes = max(1, min(processes, clients))
    if processes == 1:
        return asyncio.run(run_load(url, clients, seconds, crops, endpoint, batch_images))
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    firsts = [sum(shares[:i]) for i in range(processes)]
    jobs = [
        (url, n, seconds, crops, endpoint, batch_images, f)
        for n, f in zip(shares, firsts, strict=True)
    ]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_drive_in_process, jobs)
    latencies = [latency for part in parts for latency in part[0]]
    errors = sum(part[1] for part in parts)
    elapsed = max(part[2] for part in parts)
    cpu = sum(part[3] for part in parts)
    per_request = batch_images if endpoint == "batch" else 1
    return _summarize(endpoint, clients, per_request, latencies, errors, elapsed, cpu)


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process, from /proc (Linux)."""
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


# What --endpoints takes: /embed and /analyze with one crop a request, /embed/batch.
ENDPOINTS = ("embed", "batch", "analyze")


@dataclass
class ForwardFigures:
    rates: dict[int, float]  # img/s by batch size, every forward stream busy
    single_ms: float  # one batch of one image, alone: what a lone client waits for


def in_process_ceiling(
    model_dir: str, batch_sizes: list[int], seconds: float, precision: str, backend: str = "auto"
) -> dict[int, float]:
    """Images/s of the bare forward pass (no HTTP, no decode) at each batch size, with a
    batch in flight on every forward stream the runtime has, as the service runs it."""
    return forward_figures(model_dir, batch_sizes, seconds, precision, backend).rates


class ForwardProbe:
    """The bare forward pass of one configuration (no HTTP, no decoding), loaded once and
    timed on demand, so a load tool can interleave it with a server's runs: on a shared
    machine that drifts by tens of percent in minutes, a ratio means something only
    between figures taken moments apart."""

    def __init__(
        self, model_dir: str, precision: str, backend: str = "auto", streams: int = 1
    ) -> None:
        from app.config import Settings
        from app.inference.model import ClipImageEncoder

        settings = Settings(
            model=f"local-dir:{model_dir}",
            precision=precision,
            backend=backend,
            forward_streams=streams,  # OpenVINO's; the others run one pass at a time
            warmup=False,
        )
        self.encoder = ClipImageEncoder.load(settings)
        crop = Image.open(io.BytesIO(make_crops(1)[0])).convert("RGB")
        self._input = self.encoder.preprocess(crop)
        # A batch in flight on every forward stream the runtime has, as the service runs it.
        self._streams = self.encoder.info.streams
        self._pool = ThreadPoolExecutor(self._streams)
        self._warm: set[int] = set()

    def rate(self, size: int, seconds: float) -> float:
        """Images/s at batch `size` over `seconds`."""
        batch = [self._input] * size
        if size not in self._warm:  # a runtime's first pass at a shape pays for the shape
            list(self._pool.map(self.encoder.encode, [batch] * self._streams))
            self._warm.add(size)

        def encode_for(seconds: float) -> int:
            done, began = 0, time.perf_counter()
            while time.perf_counter() - began < seconds:
                self.encoder.encode(batch)
                done += size
            return done

        began = time.perf_counter()
        done = sum(self._pool.map(encode_for, [seconds] * self._streams))
        return done / (time.perf_counter() - began)

    def single_ms(self, seconds: float) -> float:
        """Milliseconds of one batch of one image, alone: what a lone client waits for."""
        alone = [self._input]
        began, calls = time.perf_counter(), 0
        while time.perf_counter() - began < seconds or calls < 3:
            self.encoder.encode(alone)
            calls += 1
        return 1000 * (time.perf_counter() - began) / calls

    def close(self) -> None:
        self._pool.shutdown()


def forward_figures(
    model_dir: str, batch_sizes: list[int], seconds: float, precision: str, backend: str = "auto"
) -> ForwardFigures:
    probe = ForwardProbe(model_dir, precision, backend)
    try:
        rates = {size: probe.rate(size, seconds) for size in batch_sizes}
        return ForwardFigures(rates, probe.single_ms(min(seconds, 2.0)))
    finally:
        probe.close()


def start_server(
    model_dir: str, port: int, extra_env: dict[str, str], cwd: str | None = None
) -> subprocess.Popen[bytes]:
    """The service on `port`, from the checkout in `cwd` (default: this one)."""
    env = {**os.environ, "CLIP_MODEL": f"local-dir:{model_dir}", **extra_env}
    # The production entry point: its connection limits and graceful SIGTERM included.
    command = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)]
    # A file, not a pipe: nobody reads a pipe during the run, and a full one would block
    # the server on its next access-log line.
    log = Path(tempfile.gettempdir()) / f"clip-service-{port}.log"
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    return wait_until_ready(process, f"http://127.0.0.1:{port}/ready", log, "service")


def wait_until_ready(
    process: subprocess.Popen[bytes], url: str, log: Path, what: str, timeout_s: float = 180
) -> subprocess.Popen[bytes]:
    """`process` once `url` answers 200; SystemExit with its log if it dies or stalls."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited at startup:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # the startup tool times this wait
    process.kill()
    raise SystemExit(f"{what} not ready after {timeout_s:.0f} s")


def start_load_tool() -> None:
    """What every load tool's `main` does first.

    SIGTERM (a cancelled CI job, `timeout`, `kill`) becomes an exit through the tools'
    `finally` blocks, which stop the servers they started: by default Python dies on it
    at once and leaves them, the LitServe peer's own session included, holding ports.
    And output is written a line at a time even into a file or a pipe (`> run.log`,
    `| tee`), where Python would hold a run's progress in its buffer until the end.
    """

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


def main(argv: list[str] | None = None) -> None:
    start_load_tool()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="drive a running service")
    target.add_argument("--model-dir", help="start the service on this local-dir model")
    parser.add_argument("--clients", default="1,16", help="comma-separated client counts")
    parser.add_argument(
        "--endpoints", default="embed", help="comma-separated: embed, batch, analyze"
    )
    parser.add_argument("--batch-images", type=int, default=32, help="crops per /embed/batch")
    parser.add_argument("--precision", default="fp32", help="CLIP_PRECISION of service and ceiling")
    parser.add_argument("--seconds", type=float, default=20.0, help="per client count")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--no-ceiling", action="store_true", help="skip the in-process ceiling")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="spread the clients over this many processes (for hosts with cores to spare)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients {args.clients!r}: comma-separated whole numbers, e.g. 1,16")
    endpoints = args.endpoints.split(",")
    unknown = sorted(set(endpoints) - set(ENDPOINTS))
    if unknown:
        choices = ", ".join(ENDPOINTS)
        parser.error(f"--endpoints: {', '.join(unknown)} unknown; choose from {choices}")
    crops = make_crops(64)

    ceiling: dict[int, float] = {}
    measure_ceiling = bool(args.model_dir) and not args.no_ceiling
    sizes = sorted({1, 8, 16, 32, args.batch_images})
    ceiling_seconds = min(args.seconds, 8)
    if measure_ceiling:
        before = in_process_ceiling(args.model_dir, sizes, ceiling_seconds, args.precision)

    server = None
    memory: dict[str, float] = {}
    if args.model_dir:
        server = start_server(args.model_dir, args.port, {"CLIP_PRECISION": args.precision})
        memory["startup_peak_mb"] = memory_mb(server.pid)[1]
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        try:
            info = httpx.get(f"{url}/info", timeout=10).json()
        except httpx.TransportError as exc:
            raise SystemExit(f"no CLIP service answers at {url}: {exc}") from None
        print(
            f"service: {info['model']} on {info['device']} ({info['precision']}), "
            f"max batch {info['batcher']['max_batch_size']}, "
            f"wait {info['batcher']['max_wait_ms']} ms, decoding in "
            f"{info['batcher']['decode_workers']} threads and "
            f"{info['batcher'].get('decode_processes', 0)} processes"
        )
        results: list[LoadResult] = []
        for endpoint in endpoints:
            warm = run_load(url, max(counts), 3.0, crops, endpoint, args.batch_images)
            asyncio.run(warm)
            for count in counts:
                results.append(
                    run_load_in_processes(
                        url,
                        count,
                        args.seconds,
                        crops,
                        endpoint,
                        args.batch_images,
                        args.client_processes,
                    )
                )
        if server is not None:
            memory["steady_mb"], memory["peak_mb"] = memory_mb(server.pid)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    if measure_ceiling:
        # Shared machines drift by tens of percent over minutes: the ceiling is measured
        # before and after the service runs, and the service is compared with the mean.
        after = in_process_ceiling(args.model_dir, sizes, ceiling_seconds, args.precision)
        ceiling = {size: (before[size] + after[size]) / 2 for size in sizes}
        print(f"in-process forward, {args.precision} (no HTTP, no decode), before / after:")
        for size in sizes:
            print(f"  batch {size:>2}: {before[size]:7.1f} / {after[size]:7.1f} img/s")

    print(f"\nclients in {args.client_processes} process(es); client CPU in % of one core")
    columns = "endpoint | clients | requests | errors | crops/s | p50 ms | p95 ms | p99 ms"
    print(f"\n| {columns} | client CPU % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        name = f"/embed/batch x{args.batch_images}" if r.endpoint == "batch" else f"/{r.endpoint}"
        print(
            f"| {name} | {r.clients} | {r.requests} | {r.errors} | {r.images_per_s:.1f} | "
            f"{r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.p99_ms:.1f} | {r.client_cpu_pct:.0f} |"
        )
    for endpoint in endpoints:
        runs = [r for r in results if r.endpoint == endpoint]
        for r in runs[1:]:
            print(
                f"{endpoint}: {r.clients} clients / {runs[0].clients} client: "
                f"{r.images_per_s / runs[0].images_per_s:.2f}x"
            )
        if ceiling and endpoint != "analyze":
            best = max(runs, key=lambda r: r.images_per_s)
            top = max(ceiling.values())
            print(
                f"{endpoint} at {best.clients} clients / in-process ceiling "
                f"({top:.1f} img/s): {best.images_per_s / top:.2f}"
            )
        if ceiling and endpoint == "embed" and 1 in ceiling:
            single = next((r for r in runs if r.clients == 1), None)
            if single is not None:
                print(
                    f"embed p50 with 1 client: {single.p50_ms:.1f} ms against the in-process "
                    f"batch-1 forward {1000 / ceiling[1]:.1f} ms "
                    f"(+{single.p50_ms - 1000 / ceiling[1]:.1f} ms)"
                )
    if memory:
        print(
            "service memory: startup peak {startup_peak_mb:.0f} MB, steady {steady_mb:.0f} MB, "
            "peak overall {peak_mb:.0f} MB".format(**memory)
        )
    if args.json:
        document = {"ceiling": ceiling, "memory": memory, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
