"""Seconds from exec to a 200 from /ready, per configuration, warm and cold.

What a rolling update or an autoscaler waits for: `python -m app` is started as its
users start it, and timed until /ready answers 200 (imports, loading, the garment
prompts, the conversion on a cold cache, the warm-up passes). Each configuration
(CLIP_X=V settings, comma-separated; "" = the defaults) first starts once to fill a
conversion cache of the tool's own, then is timed `--rounds` times on it (warm) and,
with `--cold`, as often on an empty one (what a first start, or a new version, costs).
`--against DIR` times another checkout too, each start of one beside the same start of
the other, so a slow spell of a shared machine falls on both:

    git worktree add /tmp/old HEAD~1
    python -m load_tests.startup --model-dir models/vit-b-32-random --rounds 2 \\
        --against /tmp/old "" CLIP_BACKEND=torch --cold
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from load_tests.compare import stop
from load_tests.concurrency import start_load_tool, start_server
from load_tests.memory import configurations_parser, parse_configuration


@dataclass
class Startup:
    configuration: str
    checkout: str
    cache: str  # "warm" or "cold"
    seconds: list[float] = field(default_factory=list)


def time_to_ready(model_dir: str, port: int, settings: dict[str, str], checkout: str) -> float:
    started = time.monotonic()
    server = start_server(model_dir, port, settings, cwd=checkout)
    seconds = time.monotonic() - started
    stop(server)
    return seconds


def measure(
    model_dir: str,
    configurations: list[str],
    checkouts: list[str],
    rounds: int,
    cold: bool,
    port: int,
) -> list[Startup]:
    caches = ("warm", "cold") if cold else ("warm",)
    # Read once, before any start: a mistyped one stops the run before minutes of priming.
    parsed = {configuration: parse_configuration(configuration) for configuration in configurations}
    results = {
        (configuration, checkout, cache): Startup(configuration or "defaults", checkout, cache)
        for configuration in configurations
        for checkout in checkouts
        for cache in caches
    }
    with tempfile.TemporaryDirectory(prefix="clip-startup-") as scratch:
        warm_dir = Path(scratch, "warm")
        for configuration in configurations:
            settings = {**parsed[configuration], "CLIP_CACHE_DIR": str(warm_dir)}
            for checkout in checkouts:  # fills the cache: versions may key it apart
                time_to_ready(model_dir, port, settings, checkout)
        for round_number in range(rounds):
            for configuration in configurations:
                for cache in caches:
                    for checkout in checkouts:
                        cache_dir = warm_dir
                        if cache == "cold":
                            cache_dir = Path(tempfile.mkdtemp(dir=scratch, prefix="cold-"))
                        settings = {**parsed[configuration], "CLIP_CACHE_DIR": str(cache_dir)}
                        seconds = time_to_ready(model_dir, port, settings, checkout)
                        results[configuration, checkout, cache].seconds.append(seconds)
                        print(f"round {round_number}: {configuration or 'defaults'} "
                              f"({checkout}, {cache} cache): {seconds:.1f} s",
                              flush=True)  # fmt: skip
    return list(results.values())


def main(argv: list[str] | None = None) -> None:
    start_load_tool()
    parser = configurations_parser(__doc__.split("\n\n")[0], port=8891)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--against", help="another checkout, timed beside this one")
    args = parser.parse_args(argv)

    here = os.getcwd()
    checkouts = [here] if args.against is None else [here, os.path.abspath(args.against)]
    startups = measure(
        os.path.abspath(args.model_dir),
        args.configurations,
        checkouts,
        args.rounds,
        args.cold,
        args.port,
    )
    print("\n| configuration | checkout | cache | seconds to ready, median (min-max) | runs |")
    print("|---|---|---|---:|---|")
    for startup in startups:
        runs = startup.seconds
        print(f"| {startup.configuration} | {startup.checkout} | {startup.cache} | "
              f"{statistics.median(runs):.1f} ({min(runs):.1f}-{max(runs):.1f}) | "
              f"{' '.join(f'{s:.1f}' for s in runs)} |")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([asdict(s) for s in startups], handle, indent=2)


if __name__ == "__main__":
    main()
