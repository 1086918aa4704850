"""The service against its ceiling and a peer, in one run, with a client that costs little.

For each client count, wrk (a C load generator; `apt-get install wrk`) posts the same
128x256 JPEG crop to our /embed (multipart) and to a LitServe server of the same model
(JSON base64, load_tests/litserve_peer.py), one after the other. The in-process ceilings
(the bare forward pass, no HTTP, no decoding) are measured before and after, since
shared machines drift: torch at the best torch precision for this CPU, and the service's
own backend and precision. Reported per run: crops/s, p50/p99, non-200s, the client's
own CPU (so a figure measures the server, not the load generator) and each server's CPU
per request. Loopback only; every run is bounded in time.

    python -m load_tests.compare --model-dir models/vit-b-32-random --clients 1,16
    python -m load_tests.compare --model-dir models/vit-b-32-random --precision int8
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from load_tests.concurrency import (
    ForwardFigures,
    forward_figures,
    make_crops,
    memory_mb,
    start_server,
    wait_until_ready,
)

_LUA = """
local file = io.open(os.getenv("WRK_BODY_FILE"), "rb")
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    server: str
    clients: int
    requests: int
    non_200: int
    seconds: float
    crops_per_s: float
    p50_ms: float
    p99_ms: float
    client_cpu_pct: float  # of one core
    server_cpu_ms_per_request: float


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants (LitServe forks workers)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        process = int(entry.name)
        children.setdefault(int(fields[1]), []).append(process)
        times[process] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    total, stack = 0.0, [pid]
    while stack:
        process = stack.pop()
        total += times.get(process, 0.0)
        stack.extend(children.get(process, []))
    return total


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


def run_wrk(
    name: str, url: str, body: bytes, content_type: str, clients: int, seconds: float, pid: int
) -> Run:
    with tempfile.TemporaryDirectory() as folder:
        script, payload = Path(folder) / "post.lua", Path(folder) / "body"
        script.write_text(_LUA)
        payload.write_bytes(body)
        env = {**os.environ, "WRK_BODY_FILE": str(payload), "WRK_CONTENT_TYPE": content_type}
        threads = min(2, clients)
        command = ["wrk", f"-t{threads}", f"-c{clients}", f"-d{seconds:g}s", "--latency",
                   "--timeout", "60s", "-s", str(script), url]  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_before = tree_cpu_seconds(pid)
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        server_cpu = tree_cpu_seconds(pid) - server_before
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = output.stdout
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", text).group(1))  # type: ignore[union-attr]
    non_200_match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    non_200 = int(non_200_match.group(1)) if non_200_match else 0
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    good = requests - non_200
    return Run(
        server=name,
        clients=clients,
        requests=requests,
        non_200=non_200,
        seconds=seconds,
        crops_per_s=good / seconds,
        p50_ms=_ms(p50.group(1)) if p50 else float("nan"),
        p99_ms=_ms(p99.group(1)) if p99 else float("nan"),
        client_cpu_pct=100 * client_cpu / seconds,
        server_cpu_ms_per_request=1000 * server_cpu / max(1, requests),
    )


def multipart(crop: bytes) -> tuple[bytes, str]:
    boundary = "clipreidloadboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="c.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + crop
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def start_peer(model_dir: str, port: int) -> subprocess.Popen[bytes]:
    log = Path(tempfile.gettempdir()) / f"litserve-peer-{port}.log"
    command = [sys.executable, "-m", "load_tests.litserve_peer", "--model-dir", model_dir,
               "--port", str(port)]  # fmt: skip
    # Its own session: LitServe forks workers, and stop() must end all of them.
    process = subprocess.Popen(
        command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    return wait_until_ready(process, f"http://127.0.0.1:{port}/health", log, "LitServe peer")


def stop(process: subprocess.Popen[bytes]) -> None:
    """End a server and every process it forked (those in its session, if it has one)."""
    group = os.getpgid(process.pid) if process.poll() is None else None
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    if group is not None and group == process.pid:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def best_torch_precision() -> str:
    from app.inference.model import cpu_has_fast_bf16

    return "bf16" if cpu_has_fast_bf16() else "fp32"


def ceilings(
    model_dir: str, backend: str, precision: str, seconds: float
) -> dict[str, ForwardFigures]:
    """The bare forward pass per configuration: img/s by batch size, and the lone
    batch of one timed alone (what one client's request waits for)."""
    sizes = [1, 8, 16, 32]
    configs = {"torch " + best_torch_precision(): ("torch", best_torch_precision())}
    configs[f"service ({backend} {precision})"] = (backend, precision)
    configs["torch fp32 (LitServe's model)"] = ("torch", "fp32")
    return {
        name: forward_figures(model_dir, sizes, seconds, p, backend=b)
        for name, (b, p) in configs.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--seconds", type=float, default=20.0, help="per run")
    parser.add_argument("--precision", default="auto", help="CLIP_PRECISION of the service")
    parser.add_argument("--backend", default="auto", help="CLIP_BACKEND of the service")
    parser.add_argument("--port", type=int, default=8780)
    parser.add_argument("--no-peer", action="store_true", help="skip LitServe")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    counts = [int(c) for c in args.clients.split(",")]
    crop = make_crops(1)[0]

    server = start_server(
        args.model_dir, args.port, {"CLIP_PRECISION": args.precision, "CLIP_BACKEND": args.backend}
    )
    info = httpx.get(f"http://127.0.0.1:{args.port}/info", timeout=10).json()
    backend, precision = info["backend"], info["precision"]
    memory = {"startup_peak_mb": memory_mb(server.pid)[1]}
    stop(server)  # the ceilings run alone, then the servers
    before_figures = ceilings(args.model_dir, backend, precision, min(args.seconds, 6))

    runs: list[Run] = []
    ours_body, ours_type = multipart(crop)
    peer_body = json.dumps({"image": base64.b64encode(crop).decode()}).encode()
    server = start_server(
        args.model_dir, args.port, {"CLIP_PRECISION": args.precision, "CLIP_BACKEND": args.backend}
    )
    peer = None if args.no_peer else start_peer(args.model_dir, args.port + 1)
    try:
        for count in counts:
            ours = f"http://127.0.0.1:{args.port}/embed"
            run_wrk("ours", ours, ours_body, ours_type, max(counts), 3, server.pid)  # warm-up
            runs.append(
                run_wrk("ours", ours, ours_body, ours_type, count, args.seconds, server.pid)
            )
            if peer is not None:
                theirs = f"http://127.0.0.1:{args.port + 1}/predict"
                run_wrk("litserve", theirs, peer_body, "application/json", max(counts), 3, peer.pid)
                runs.append(
                    run_wrk(
                        "litserve",
                        theirs,
                        peer_body,
                        "application/json",
                        count,
                        args.seconds,
                        peer.pid,
                    )
                )
        memory["steady_mb"], memory["peak_mb"] = memory_mb(server.pid)
    finally:
        stop(server)
        if peer is not None:
            stop(peer)
    after_figures = ceilings(args.model_dir, backend, precision, min(args.seconds, 6))
    own_name = f"service ({backend} {precision})"
    single_ms = (before_figures[own_name].single_ms + after_figures[own_name].single_ms) / 2
    before = {name: figures.rates for name, figures in before_figures.items()}
    after = {name: figures.rates for name, figures in after_figures.items()}
    best = {name: (max(before[name].values()) + max(after[name].values())) / 2 for name in before}

    print(f"service: {backend} {precision}; wrk, {args.seconds:g} s per run, one 128x256 JPEG")
    print("in-process ceilings (best batch), before / after:")
    for name in before:
        first, last = max(before[name].values()), max(after[name].values())
        print(f"  {name}: {first:.1f} / {last:.1f} img/s")
    print(f"  service's batch-1 forward: {single_ms:.1f} ms (mean of before and after)")
    print("\n| server | clients | crops/s | p50 ms | p99 ms | non-200 | client CPU % | "
          "server CPU ms/req |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r.server} | {r.clients} | {r.crops_per_s:.1f} | {r.p50_ms:.1f} | "
              f"{r.p99_ms:.1f} | {r.non_200} | {r.client_cpu_pct:.1f} | "
              f"{r.server_cpu_ms_per_request:.1f} |")  # fmt: skip
    torch_best = next(iter(best.values()))
    own = best[own_name]
    for count in counts:
        ours_run = next(r for r in runs if r.server == "ours" and r.clients == count)
        line = (f"{count} clients: ours / torch {best_torch_precision()} ceiling "
                f"{ours_run.crops_per_s / torch_best:.2f}, / own ceiling "
                f"{ours_run.crops_per_s / own:.2f}")  # fmt: skip
        peer_run = next((r for r in runs if r.server == "litserve" and r.clients == count), None)
        if peer_run is not None and peer_run.crops_per_s > 0:
            line += f", / LitServe {ours_run.crops_per_s / peer_run.crops_per_s:.2f}"
        if count == 1:
            line += (
                f"; p50 {ours_run.p50_ms:.1f} ms = forward {ours_run.p50_ms - single_ms:+.1f} ms"
            )
        print(line)
    print("service memory: startup peak {startup_peak_mb:.0f} MB, steady {steady_mb:.0f} MB, "
          "peak {peak_mb:.0f} MB".format(**memory))  # fmt: skip
    if args.json:
        document = {
            "ceilings": {"before": before, "after": after},
            "runs": [asdict(r) for r in runs],
            "memory": memory,
        }
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
