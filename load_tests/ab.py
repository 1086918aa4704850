"""Two configurations of the service side by side, in paired slices: which is faster.

On a shared machine whose speed drifts by tens of percent within a minute, two figures
taken minutes apart compare the minutes, not the configurations. This tool starts both
servers (other settings, or another checkout of the code: `--b-dir`), keeps both up, and
drives them in turn with wrk in short slices, alternating which goes first; each round's
ratio B / A compares two slices seconds apart, and the report gives the median and range
over rounds. Per slice it also reads each service's own count of its forward passes
(mean batch, share of the slice the model was busy), so a difference comes with where it
came from. Loopback only; every slice is bounded in time.

    python -m load_tests.ab --model-dir models/vit-b-32-random --b CLIP_MAX_WAIT_MS=25
    git worktree add /tmp/old HEAD~1
    python -m load_tests.ab --model-dir models/vit-b-32-random --b-dir /tmp/old --clients 16
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from load_tests.compare import (
    Run,
    Served,
    multipart,
    parse_settings,
    run_wrk,
    served_totals,
    spread,
    stop,
)
from load_tests.concurrency import make_crops, start_load_tool, start_server


@dataclass
class Slice:
    """One server's wrk slice and what its model did meanwhile."""

    run: Run
    served: Served

    @property
    def model_busy(self) -> float:
        return self.served.busy(self.run.seconds)


def ratios(a: list[Slice], b: list[Slice], figure: str) -> list[float]:
    """Per round, B's figure over A's."""
    return [getattr(y.run, figure) / getattr(x.run, figure) for x, y in zip(a, b, strict=True)]


def main(argv: list[str] | None = None) -> dict[str, list[Slice]]:
    start_load_tool()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--a", action="append", default=[], help="CLIP_X=V for A (repeat)")
    parser.add_argument("--b", action="append", default=[], help="CLIP_X=V for B (repeat)")
    parser.add_argument("--a-dir", default=".", help="the checkout A runs from")
    parser.add_argument("--b-dir", default=".", help="the checkout B runs from")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=8.0, help="per server per round")
    parser.add_argument("--port", type=int, default=8810, help="A's; B's is the next")
    parser.add_argument("--json", type=Path, help="also write the slices here")
    args = parser.parse_args(argv)

    model_dir = str(Path(args.model_dir).resolve())
    body, content_type = multipart(make_crops(1)[0])
    configs = {
        "A": (parse_settings(args.a), str(Path(args.a_dir).resolve()), args.port),
        "B": (parse_settings(args.b), str(Path(args.b_dir).resolve()), args.port + 1),
    }
    servers = {}
    slices: dict[str, list[Slice]] = {"A": [], "B": []}
    try:
        for name, (env, folder, port) in configs.items():
            servers[name] = start_server(model_dir, port, env, cwd=folder)
        urls = {name: f"http://127.0.0.1:{configs[name][2]}" for name in configs}
        for name, server in servers.items():  # first passes at each shape, warm caches
            run_wrk(name, f"{urls[name]}/embed", body, content_type, args.clients, 3, server.pid)
        for index in range(args.rounds):
            order = ["A", "B"] if index % 2 == 0 else ["B", "A"]
            for name in order:
                before = served_totals(urls[name])
                run = run_wrk(name, f"{urls[name]}/embed", body, content_type, args.clients,
                              args.seconds, servers[name].pid)  # fmt: skip
                slices[name].append(Slice(run, served_totals(urls[name]) - before))
            print(f"round {index}: " + ", ".join(
                f"{name} {slices[name][-1].run.crops_per_s:.1f} crops/s" for name in configs
            ), flush=True)  # fmt: skip
    finally:
        for server in servers.values():
            stop(server)
    report(args, configs, slices)
    return slices


def report(
    args: argparse.Namespace,
    configs: dict[str, tuple[dict[str, str], str, int]],
    slices: dict[str, list[Slice]],
) -> None:
    print(f"\n{args.clients} clients, wrk, {args.rounds} rounds of {args.seconds:g} s slices, "
          "one 128x256 JPEG on /embed")  # fmt: skip
    for name, (env, folder, _) in configs.items():
        mine = slices[name]
        described = " ".join(f"{k}={v}" for k, v in env.items()) or "defaults"
        print(
            f"{name} ({described}, {folder}): crops/s "
            f"{spread([s.run.crops_per_s for s in mine])}, p50 ms "
            f"{spread([s.run.p50_ms for s in mine])}, server CPU ms/crop "
            f"{spread([s.run.server_cpu_ms_per_request for s in mine])}, mean batch "
            f"{spread([s.served.mean_batch for s in mine])}, model busy "
            f"{spread([s.model_busy for s in mine])}"
        )
    a, b = slices["A"], slices["B"]
    print(f"B / A, per round: crops/s {spread(ratios(a, b, 'crops_per_s'))}, "
          f"p50 {spread(ratios(a, b, 'p50_ms'))}, server CPU per crop "
          f"{spread(ratios(a, b, 'server_cpu_ms_per_request'))}")  # fmt: skip
    wins = sum(r > 1 for r in ratios(a, b, "crops_per_s"))
    print(f"B served more crops/s in {wins} of {len(a)} rounds; median "
          f"{statistics.median(ratios(a, b, 'crops_per_s')):.2f}")  # fmt: skip
    if args.json:
        document = {
            name: {"settings": env, "dir": folder, "slices": [asdict(s) for s in slices[name]]}
            for name, (env, folder, _) in configs.items()
        }
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
