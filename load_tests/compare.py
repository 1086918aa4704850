"""The service against its ceiling and a peer, in one run, with a client that costs little.

For each client count, wrk (a C load generator; `apt-get install wrk`) posts the same
128x256 JPEG crop to our /embed (multipart) and to a LitServe server of the same model
(JSON base64, load_tests/litserve_peer.py), one after the other, in rounds. Between the
runs, with both servers up (ours idle; the peer stopped, as idle its workers poll),
this process times the in-process ceilings (the bare forward pass, no HTTP, no
decoding, at each configuration's best batch): torch at the best torch precision for
this CPU, the service's own backend and precision, and torch fp32 (LitServe's model).
Shared machines drift by tens of percent within minutes, so each run is compared with
the ceilings measured just before and just after it, and a ratio is reported as the
median and range over rounds. The service's own ceiling is given twice: at its best
batch, and at the best batch the clients can fill (16 closed-loop clients never make a
batch of 32), and a third time at the batch the service actually served in the run (its
/metrics), probed right after it; the same counts give the share of the run its model
was busy. The full batch-size scans run before and after all rounds. Reported per run:
crops/s, p50/p99, non-200s, the client's own CPU (so a figure measures the server, not
the load generator) and each server's CPU per request. Loopback only; every run is
bounded in time.

    python -m load_tests.compare --model-dir models/vit-b-32-random --clients 1,16
    python -m load_tests.compare --model-dir models/vit-b-32-random --precision int8
    python -m load_tests.compare --model-dir models/vit-b-32-random --setting CLIP_MAX_WAIT_MS=25
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
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from load_tests.concurrency import (
    ForwardProbe,
    make_crops,
    memory_mb,
    start_load_tool,
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


def _signal_session(process: subprocess.Popen[bytes], number: signal.Signals) -> None:
    """`number` to a server started in its own session and every process it forked."""
    if process.poll() is None:
        os.killpg(os.getpgid(process.pid), number)


@contextlib.contextmanager
def resumed(peer: subprocess.Popen[bytes] | None) -> Iterator[None]:
    """The peer, otherwise stopped (SIGSTOP), runs for the block. Idle, LitServe's workers
    poll their queues: 10-14 % of a core on 2 cores (ours: ~0.2 %), taken from whatever
    runs beside them, so the peer only runs while it is the one measured."""
    if peer is None:
        yield
        return
    _signal_session(peer, signal.SIGCONT)
    try:
        yield
    finally:
        _signal_session(peer, signal.SIGSTOP)


def stop(process: subprocess.Popen[bytes]) -> None:
    """End a server and every process it forked (those in its session, if it has one)."""
    group = os.getpgid(process.pid) if process.poll() is None else None
    if group is not None and group == process.pid:
        os.killpg(group, signal.SIGCONT)  # a stopped process keeps a SIGTERM pending
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    if group is not None and group == process.pid:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def best_torch_precision() -> str:
    from app.inference.cpu_features import cpu_has_fast_bf16

    return "bf16" if cpu_has_fast_bf16() else "fp32"


_SCAN_SIZES = [1, 8, 16, 32]


@dataclass
class Round:
    """One client count's round: the ceilings just before, each server's run, and the
    ceilings just after (the next round's "before")."""

    clients: int
    ceilings_before: dict[str, float]  # img/s at each probe's best batch
    ceilings_after: dict[str, float]
    single_ms: float  # the service's batch-1 forward, around this round
    ours: Run
    peer: Run | None
    # The service's own forward passes during its run, from its /metrics: the lone
    # client's overhead without the drift between this process's probe and the server,
    # and under load where the gap to the ceiling goes (batch size, model idle).
    served: Served | None = None
    # The service's own ceiling at the batch size it served in this run (probed right
    # after it): how much of its model's speed at that batch the service delivers.
    served_ceiling: float = float("nan")

    @property
    def model_busy(self) -> float:
        return self.served.busy(self.ours.seconds) if self.served else float("nan")

    def ceiling(self, name: str) -> float:
        return (self.ceilings_before[name] + self.ceilings_after[name]) / 2


@dataclass(frozen=True)
class Served:
    """The service's own count of its forward passes (its /metrics): totals so far, or,
    subtracted, what one run did."""

    forward_seconds: float
    passes: float
    images: float

    def __sub__(self, earlier: Served) -> Served:
        return Served(
            self.forward_seconds - earlier.forward_seconds,
            self.passes - earlier.passes,
            self.images - earlier.images,
        )

    @property
    def pass_ms(self) -> float:
        return 1000 * self.forward_seconds / self.passes if self.passes else float("nan")

    @property
    def mean_batch(self) -> float:
        return self.images / self.passes if self.passes else float("nan")

    def busy(self, seconds: float) -> float:
        """Fraction of `seconds` the model spent in these forward passes."""
        return self.forward_seconds / seconds


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """`CLIP_NAME=value` strings (command-line options) to a service environment."""
    env = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name.startswith("CLIP_"):
            raise SystemExit(f"settings take CLIP_NAME=value, not {pair!r}")
        env[name] = value
    return env


def served_totals(base_url: str) -> Served:
    """The service's forward passes so far: seconds, passes and images (its /metrics)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    names = ("clip_forward_seconds_sum", "clip_forward_seconds_count", "clip_batch_size_sum")
    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return Served(*(totals[name] for name in names))


def probe_names(backend: str, precision: str) -> dict[str, tuple[str, str]]:
    """The in-process ceilings a report compares with: the best torch precision for this
    CPU, the service's own backend and precision, and LitServe's model (torch fp32)."""
    torch_best = best_torch_precision()
    return {
        f"torch {torch_best}": ("torch", torch_best),
        f"service ({backend} {precision})": (backend, precision),
        "torch fp32 (LitServe's model)": ("torch", "fp32"),
    }


def scan(probes: dict[str, ForwardProbe], seconds: float) -> dict[str, dict[int, float]]:
    return {
        name: {size: p.rate(size, seconds) for size in _SCAN_SIZES} for name, p in probes.items()
    }


REACHABLE = "own, at a batch no larger than the clients"


def reachable_size(rates: dict[int, float], clients: int) -> int:
    """The fastest scanned batch size that `clients` closed-loop clients can fill."""
    fitting = [size for size in rates if size <= clients] or [min(rates)]
    return max(fitting, key=rates.__getitem__)


def spread(values: list[float]) -> str:
    """Median (min-max) of per-round figures."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> None:
    start_load_tool()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--seconds", type=float, default=10.0, help="per server per round")
    parser.add_argument("--rounds", type=int, default=3, help="per client count")
    parser.add_argument(
        "--ceiling-seconds", type=float, default=3.0, help="per in-process ceiling per round"
    )
    parser.add_argument("--precision", default="auto", help="CLIP_PRECISION of the service")
    parser.add_argument("--backend", default="auto", help="CLIP_BACKEND of the service")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="CLIP_NAME=VALUE",
        help="another setting for the service (repeatable), e.g. CLIP_MAX_WAIT_MS=25",
    )
    parser.add_argument("--port", type=int, default=8780)
    parser.add_argument("--no-peer", action="store_true", help="skip LitServe")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    counts = [int(c) for c in args.clients.split(",")]
    crop = make_crops(1)[0]
    ours_body, ours_type = multipart(crop)
    peer_body = json.dumps({"image": base64.b64encode(crop).decode()}).encode()
    base_url = f"http://127.0.0.1:{args.port}"
    ours_url = f"{base_url}/embed"
    peer_url = f"http://127.0.0.1:{args.port + 1}/predict"

    settings = {
        "CLIP_PRECISION": args.precision,
        "CLIP_BACKEND": args.backend,
        **parse_settings(args.setting),
    }
    server = start_server(args.model_dir, args.port, settings)
    peer = None
    probes: dict[str, ForwardProbe] = {}
    try:
        info = httpx.get(f"{base_url}/info", timeout=10).json()
        backend, precision = info["backend"], info["precision"]
        memory = {"startup_peak_mb": memory_mb(server.pid)[1]}
        peer = None if args.no_peer else start_peer(args.model_dir, args.port + 1)
        if peer is not None:
            _signal_session(peer, signal.SIGSTOP)  # resumed only for its own runs
        # The servers stay up while the ceilings run in this process (ours idle, the peer
        # stopped): each server's run sits between two ceiling measurements taken
        # seconds apart.
        names = probe_names(backend, precision)
        _, own_name, _ = names
        # The service's own ceiling runs as many passes at once as the service does.
        streams = int(info["batcher"]["forward_streams"])
        probes = {
            name: ForwardProbe(args.model_dir, p, b, streams if name == own_name else 1)
            for name, (b, p) in names.items()
        }
        own = probes[own_name]
        before = scan(probes, args.ceiling_seconds)
        best_size = {name: max(rates, key=rates.__getitem__) for name, rates in before.items()}

        def ceilings_now(count: int) -> tuple[dict[str, float], float]:
            rates = {n: p.rate(best_size[n], args.ceiling_seconds) for n, p in probes.items()}
            # What `count` closed-loop clients can reach: no batch holds more than them,
            # shared among the streams that each keep a batch in flight.
            fit = reachable_size(before[own_name], max(1, count // streams))
            same = fit == best_size[own_name]
            rates[REACHABLE] = rates[own_name] if same else own.rate(fit, args.ceiling_seconds)
            return rates, own.single_ms(min(args.ceiling_seconds, 2.0))

        rounds: list[Round] = []
        for count in counts:
            run_wrk("ours", ours_url, ours_body, ours_type, count, 3, server.pid)  # warm-up
            if peer is not None:
                with resumed(peer):
                    run_wrk("litserve", peer_url, peer_body, "application/json", count, 3,
                            peer.pid)  # fmt: skip
            latest, single = ceilings_now(count)
            for _ in range(args.rounds):
                served_before = served_totals(base_url)
                ours = run_wrk("ours", ours_url, ours_body, ours_type, count, args.seconds,
                               server.pid)  # fmt: skip
                served = served_totals(base_url) - served_before
                served_size = max(1, round(served.mean_batch)) if served.passes else 1
                served_ceiling = own.rate(served_size, args.ceiling_seconds)
                theirs = None
                if peer is not None:
                    with resumed(peer):
                        theirs = run_wrk("litserve", peer_url, peer_body, "application/json",
                                         count, args.seconds, peer.pid)  # fmt: skip
                following, single_after = ceilings_now(count)
                rounds.append(
                    Round(
                        count,
                        latest,
                        following,
                        (single + single_after) / 2,
                        ours,
                        theirs,
                        served,
                        served_ceiling,
                    )
                )
                latest, single = following, single_after
        memory["steady_mb"], memory["peak_mb"] = memory_mb(server.pid)
        after = scan(probes, args.ceiling_seconds)
    finally:
        stop(server)
        if peer is not None:
            stop(peer)
        for probe in probes.values():
            probe.close()
    report(args, backend, precision, before, after, best_size, rounds, memory)


def report(
    args: argparse.Namespace,
    backend: str,
    precision: str,
    before: dict[str, dict[int, float]],
    after: dict[str, dict[int, float]],
    best_size: dict[str, int],
    rounds: list[Round],
    memory: dict[str, float],
) -> None:
    torch_name, own_name, fp32_name = probe_names(backend, precision)
    extra = "".join(f", {setting}" for setting in args.setting)
    print(f"service: {backend} {precision}{extra}; wrk; {args.rounds} rounds per client "
          f"count, each {args.seconds:g} s per server between ceilings of "
          f"{args.ceiling_seconds:g} s; one 128x256 JPEG")  # fmt: skip
    print("in-process ceilings, img/s by batch size, before / after the rounds:")
    for name in before:
        sizes = ", ".join(
            f"{size}: {before[name][size]:.1f} / {after[name][size]:.1f}" for size in _SCAN_SIZES
        )
        print(f"  {name}: {sizes} (rounds use batch {best_size[name]})")
    print("\n| clients | round | ours crops/s | p50 ms | p99 ms | non-200 | client CPU % | "
          "server CPU ms/req | torch ceiling | own ceiling | own, batch <= clients | "
          "own batch-1 ms | served batch | own at served batch | model busy | "
          "LitServe crops/s | LitServe CPU ms/req |")  # fmt: skip
    print("|" + "---:|" * 17)
    for index, r in enumerate(rounds):
        o = r.ours
        peer = (f"{r.peer.crops_per_s:.1f} | {r.peer.server_cpu_ms_per_request:.1f}"
                if r.peer else "- | -")  # fmt: skip
        print(f"| {r.clients} | {index} | {o.crops_per_s:.1f} | {o.p50_ms:.1f} | {o.p99_ms:.1f} | "
              f"{o.non_200} | {o.client_cpu_pct:.1f} | {o.server_cpu_ms_per_request:.1f} | "
              f"{r.ceiling(torch_name):.1f} | {r.ceiling(own_name):.1f} | "
              f"{r.ceiling(REACHABLE):.1f} | {r.single_ms:.1f} | "
              f"{r.served.mean_batch if r.served else float('nan'):.1f} | "
              f"{r.served_ceiling:.1f} | {r.model_busy:.2f} | {peer} |")  # fmt: skip
    print("\nper round, median (min-max):")
    for count in dict.fromkeys(r.clients for r in rounds):
        mine = [r for r in rounds if r.clients == count]
        line = (
            f"{count} clients: ours / torch {torch_name.split()[1]} ceiling "
            f"{spread([r.ours.crops_per_s / r.ceiling(torch_name) for r in mine])}, "
            f"/ own ceiling {spread([r.ours.crops_per_s / r.ceiling(own_name) for r in mine])}"
            f" (at the best batch {count} clients fill: "
            f"{spread([r.ours.crops_per_s / r.ceiling(REACHABLE) for r in mine])})"
        )
        peers = [r.ours.crops_per_s / r.peer.crops_per_s for r in mine if r.peer]
        if peers:
            line += f", / LitServe {spread(peers)}"
        fp32 = [r.ours.crops_per_s / r.ceiling(fp32_name) for r in mine]
        line += f", / torch fp32 ceiling {spread(fp32)}"
        if count == 1:
            over = [r.ours.p50_ms - r.single_ms for r in mine]
            line += f"; p50 - batch-1 forward {spread(over)} ms"
            served = [r.ours.p50_ms - r.served.pass_ms for r in mine if r.served]
            line += f" (- the service's own forward passes in the run: {spread(served)} ms)"
        else:
            # Where the gap to the own ceiling goes: smaller batches than the ceiling's,
            # or the model waiting between passes.
            batches = [r.served.mean_batch for r in mine if r.served]
            at_served = [r.ours.crops_per_s / r.served_ceiling for r in mine]
            line += (f"; the service's model busy {spread([r.model_busy for r in mine])} of "
                     f"the run, mean batch {spread(batches)}, / own ceiling at that batch "
                     f"{spread(at_served)}")  # fmt: skip
        print(line)
    print("service memory: startup peak {startup_peak_mb:.0f} MB, steady {steady_mb:.0f} MB, "
          "peak {peak_mb:.0f} MB".format(**memory))  # fmt: skip
    if args.json:
        document = {
            "backend": backend,
            "precision": precision,
            "settings": args.setting,
            "ceilings": {"before": before, "after": after, "best_batch": best_size},
            "rounds": [asdict(r) for r in rounds],
            "memory": memory,
        }
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
