"""What the service costs around the model: crops/s and CPU per crop with the model free.

Serves the real app (uvicorn, multipart, admission, decode, preprocessing, batcher, base64
JSON) around a stand-in encoder that keeps the real preprocessing but answers a forward
pass with fixed rows after `--forward-ms` per batch (0: instantly; a GPU's time is
realistic). So the figures are the service's own: the most crops/s it can hand a model
that is never the bottleneck (a GPU's case), and the CPU each request costs outside the
model (a CPU deployment pays it out of the model's cores). wrk drives /embed (one crop
per request) and /embed/batch (`--batch-images` crops per request). Loopback only; every
run is bounded in time.

    python -m load_tests.overhead --model-dir models/vit-b-32-random --clients 1,16
    python -m load_tests.overhead --model-dir models/vit-b-32-random --forward-ms 5
    CLIP_DECODE_PROCESSES=2 python -m load_tests.overhead --model-dir models/vit-b-32-random

The "main process" column is the server process alone: with decode processes, what is
left on its one GIL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from load_tests.compare import Run, multipart, run_wrk, stop
from load_tests.concurrency import make_crops, start_load_tool, wait_until_ready


class FreeModel:
    """The real encoder's preprocessing; a forward pass that costs only `forward_s`."""

    def __init__(self, inner: Any, forward_s: float) -> None:
        self._inner = inner
        self._forward_s = forward_s
        self.info = inner.info
        row = np.zeros(inner.info.dim, np.float32)
        row[0] = 1.0
        self._row = row

    def preprocess(self, image: Any) -> Any:
        return self._inner.preprocess(image)

    def encode(self, batch: Sequence[Any]) -> npt.NDArray[np.float32]:
        if self._forward_s:
            time.sleep(self._forward_s)  # the model's time, without its CPU
        return np.tile(self._row, (len(batch), 1))

    def warm_up(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # text tower, logit scale: the real ones
        return getattr(self._inner, name)


def serve(port: int, forward_ms: float) -> int:
    """The production entry point's server, with the model replaced by FreeModel."""
    from app.config import load_settings
    from app.inference.model import ClipImageEncoder
    from app.main import create_app
    from app.observability import configure_logging
    from app.server import serve as run_server

    configure_logging()
    settings = load_settings()

    def factory(settings: Any, texts: Sequence[str]) -> FreeModel:
        return FreeModel(ClipImageEncoder.load(settings, texts), forward_ms / 1000)

    return run_server(create_app(settings, factory), settings, "127.0.0.1", port)


def start(model_dir: str, port: int, forward_ms: float, env: dict[str, str]) -> Any:
    log = Path(tempfile.gettempdir()) / f"clip-overhead-{port}.log"
    command = [sys.executable, "-m", "load_tests.overhead", "--serve", "--port", str(port),
               "--forward-ms", str(forward_ms)]  # fmt: skip
    environment = {**os.environ, "CLIP_MODEL": f"local-dir:{model_dir}", **env}
    process = subprocess.Popen(
        command, env=environment, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    return wait_until_ready(process, f"http://127.0.0.1:{port}/ready", log, "service")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (not its children: the decode processes)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_body(crops: list[bytes]) -> tuple[bytes, str]:
    request = httpx.Request(
        "POST",
        "http://x/embed/batch",
        files=[("images", (f"{i}.jpg", c, "image/jpeg")) for i, c in enumerate(crops)],
    )
    return request.read(), request.headers["content-type"]


def main(argv: list[str] | None = None) -> None:
    start_load_tool()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="local-dir model whose preprocessing is used")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--batch-images", type=int, default=32)
    parser.add_argument("--forward-ms", type=float, default=0.0, help="per forward pass")
    parser.add_argument("--seconds", type=float, default=10.0, help="per run")
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        sys.exit(serve(args.port, args.forward_ms))
    if not args.model_dir:
        parser.error("--model-dir is required")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    counts = [int(c) for c in args.clients.split(",")]
    crops = make_crops(args.batch_images)
    bodies = {
        "/embed": (*multipart(crops[0]), 1),
        f"/embed/batch x{args.batch_images}": (*batch_body(crops), args.batch_images),
    }
    server = start(args.model_dir, args.port, args.forward_ms, {"CLIP_WARMUP": "false"})
    runs: list[tuple[str, int, Run, float]] = []
    try:
        for name, (body, content_type, per_request) in bodies.items():
            url = f"http://127.0.0.1:{args.port}{name.split()[0]}"
            run_wrk(name, url, body, content_type, max(counts), 2, server.pid)  # warm-up
            for count in counts:
                before = process_cpu_seconds(server.pid)
                run = run_wrk(name, url, body, content_type, count, args.seconds, server.pid)
                main_cpu = process_cpu_seconds(server.pid) - before
                runs.append((name, per_request, run, main_cpu))
    finally:
        stop(server)

    cores = os.cpu_count() or 1
    print(f"the service with a free model ({args.forward_ms:g} ms per forward pass), "
          f"{cores} cores, wrk, {args.seconds:g} s per run")  # fmt: skip
    print("\n| endpoint | clients | crops/s | p50 ms | p99 ms | non-200 | server CPU ms/crop | "
          "of it, main process | client CPU % |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, per_request, r, main_cpu in runs:
        crops = max(1, r.requests * per_request)
        print(f"| {name} | {r.clients} | {r.crops_per_s * per_request:.1f} | {r.p50_ms:.1f} | "
              f"{r.p99_ms:.1f} | {r.non_200} | {r.server_cpu_ms_per_request / per_request:.2f} "
              f"| {1000 * main_cpu / crops:.2f} | {r.client_cpu_pct:.0f} |")  # fmt: skip
    if args.json:
        document = [
            {"endpoint": n, "crops_per_request": p, "main_process_cpu_s": c, **asdict(r)}
            for n, p, r, c in runs
        ]
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
