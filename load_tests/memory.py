"""The service's memory per configuration: resident at ready, under load, and the peak.

For each configuration (CLIP_X=V settings, comma-separated) this starts the service,
reads its resident set once /ready answers, drives /embed with wrk (a C client that
costs the machine little) for a while, and reads the resident set again and the
process's high-water mark (`VmRSS`, `VmHWM` in /proc/PID/status, Linux). `--cold` also
runs each configuration with an empty conversion cache, so the peak includes
converting the image tower (what a first start costs).

    python -m load_tests.memory --model-dir models/vit-b-32-random \\
        "" CLIP_PRECISION=int8 CLIP_BACKEND=onnxruntime --cold

(`""` is the defaults.) Memory figures are not timed, so a busy machine moves them
little; the crops/s printed beside them are only there to show the load was real.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass

from load_tests.compare import multipart, parse_settings, run_wrk, stop
from load_tests.concurrency import make_crops, memory_mb, start_load_tool, start_server


@dataclass
class Footprint:
    configuration: str
    cache: str  # "warm" or "cold"
    ready_mib: float
    steady_mib: float  # resident at the end of the load
    peak_mib: float  # the process's high-water mark: startup included
    crops_per_s: float


def parse_configuration(text: str) -> dict[str, str]:
    """`CLIP_A=1,CLIP_B=2` -> settings; "" -> the defaults."""
    return parse_settings([pair.strip() for pair in text.split(",") if pair.strip()])


def measure(
    model_dir: str, configuration: str, cold: bool, clients: int, seconds: float, port: int
) -> Footprint:
    settings = parse_configuration(configuration)
    with tempfile.TemporaryDirectory(prefix="clip-cold-cache-") as empty:
        if cold:
            settings["CLIP_CACHE_DIR"] = empty
        server = start_server(model_dir, port, settings)
        try:
            ready, _ = memory_mb(server.pid)
            body, content_type = multipart(make_crops(1)[0])
            url = f"http://127.0.0.1:{port}/embed"
            run = run_wrk("service", url, body, content_type, clients, seconds, server.pid)
            steady, peak = memory_mb(server.pid)
        finally:
            stop(server)
    return Footprint(
        configuration or "defaults", "cold" if cold else "warm", ready, steady, peak,
        run.crops_per_s,
    )  # fmt: skip


def configurations_parser(description: str, port: int) -> argparse.ArgumentParser:
    """The options of a tool that starts the service once per configuration."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", required=True, help="a local-dir open_clip model")
    parser.add_argument(
        "configurations", nargs="*", default=[""], help='CLIP_X=V,... each; "" = defaults'
    )
    parser.add_argument("--cold", action="store_true", help="also with an empty cache")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--json", help="also write the figures here")
    return parser


def main(argv: list[str] | None = None) -> None:
    start_load_tool()
    parser = configurations_parser(__doc__.split("\n\n")[0], port=8890)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args(argv)

    footprints = []
    print("| configuration | cache | ready MiB | steady MiB | peak MiB | crops/s |")
    print("|---|---|---:|---:|---:|---:|")
    for configuration in args.configurations:
        for cold in (False, True) if args.cold else (False,):
            footprint = measure(
                args.model_dir, configuration, cold, args.clients, args.seconds, args.port
            )
            footprints.append(footprint)
            print(f"| {footprint.configuration} | {footprint.cache} | "
                  f"{footprint.ready_mib:.0f} | {footprint.steady_mib:.0f} | "
                  f"{footprint.peak_mib:.0f} | {footprint.crops_per_s:.1f} |",
                  flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([asdict(f) for f in footprints], handle, indent=2)


if __name__ == "__main__":
    main()
