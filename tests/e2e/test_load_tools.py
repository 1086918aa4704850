"""The comparison tool's parts against real servers: wrk drives ours, and the LitServe
peer serves the same model (so a ratio compares servers, not models). wrk and litserve
are installed by .ci/run and `make install`; elsewhere their absence skips."""

from __future__ import annotations

import base64
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.codec import decode_embedding
from load_tests.compare import (
    multipart,
    resumed,
    run_wrk,
    start_peer,
    stop,
    tree_cpu_seconds,
)
from tests.e2e.test_server import RunningServer, free_port, server  # noqa: F401 - fixture
from tests.helpers import cosine, noise_jpeg

pytestmark = pytest.mark.e2e


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have wrk (.ci/run installs it)")
        pytest.skip("wrk not installed (apt-get install wrk)")


def test_wrk_drives_the_service_and_the_costs_are_counted(server: RunningServer) -> None:  # noqa: F811
    require_wrk()
    body, content_type = multipart(noise_jpeg(3))
    run = run_wrk("ours", f"{server.url}/embed", body, content_type, 2, 2, server.process.pid)
    assert run.requests > 0
    assert run.non_200 == 0
    assert run.crops_per_s > 0
    assert 0 < run.p50_ms <= run.p99_ms
    assert run.server_cpu_ms_per_request > 0
    assert tree_cpu_seconds(server.process.pid) > 0


def test_the_litserve_peer_serves_the_same_model(
    server: RunningServer,  # noqa: F811
    tiny_model_dir: Path,
) -> None:
    pytest.importorskip("litserve")
    crop = noise_jpeg(4)
    ours = httpx.post(f"{server.url}/embed", files={"image": ("c.jpg", crop)}).json()
    port = free_port()
    peer = start_peer(str(tiny_model_dir), port)
    try:
        reply = httpx.post(
            f"http://127.0.0.1:{port}/predict",
            json={"image": base64.b64encode(crop).decode()},
            timeout=30,
        )
    finally:
        stop(peer)
    assert reply.status_code == 200, reply.text
    theirs = np.frombuffer(base64.b64decode(reply.json()["embedding"]), dtype="<f4")
    assert cosine(decode_embedding(ours["embedding"]), theirs) >= 0.9999


def test_the_peer_runs_only_for_its_own_runs_and_stops_when_stopped(tiny_model_dir: Path) -> None:
    """Idle, LitServe's workers poll (10-14 % of a core): the compare tool keeps the peer
    stopped but for its own runs, so it takes nothing from ours or the ceilings."""
    pytest.importorskip("litserve")
    port = free_port()
    peer = start_peer(str(tiny_model_dir), port)
    predict = f"http://127.0.0.1:{port}/predict"
    body = {"image": base64.b64encode(noise_jpeg(4)).decode()}
    try:
        idle_before = tree_cpu_seconds(peer.pid)
        time.sleep(2)
        polling = tree_cpu_seconds(peer.pid) - idle_before
        os.killpg(peer.pid, signal.SIGSTOP)  # as the compare tool leaves it between runs
        stopped_before = tree_cpu_seconds(peer.pid)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(predict, json=body, timeout=1)
        time.sleep(1)
        assert tree_cpu_seconds(peer.pid) == stopped_before
        with resumed(peer):
            assert httpx.post(predict, json=body, timeout=30).status_code == 200
        stopped_again = tree_cpu_seconds(peer.pid)
        time.sleep(1)
        assert tree_cpu_seconds(peer.pid) == stopped_again
    finally:
        began = time.monotonic()
        stop(peer)  # stopped: SIGTERM alone would wait for a SIGCONT
    assert time.monotonic() - began < 20
    assert peer.poll() is not None
    print(f"the idle peer used {polling:.2f} s of CPU in 2 s")


def test_the_frames_tool_sends_both_ways_and_counts_the_bytes(server: RunningServer) -> None:  # noqa: F811
    from load_tests.frames import main as frames_main
    from load_tests.frames import make_scene

    scene = make_scene(people=4, seed=1)
    assert len(scene.boxes) == len(scene.crops) == 4
    results = frames_main(
        ["--url", server.url, "--clients", "2", "--seconds", "1", "--people", "4"]
    )
    assert {r.way for r in results} == {"frame", "batch"}
    for result in results:
        assert result.requests > 0
        assert result.errors == 0
        assert result.crops_per_s > 0
        assert result.request_bytes_per_crop > 0
    frame = next(r for r in results if r.way == "frame")
    batch = next(r for r in results if r.way == "batch")
    # The frame carries its whole picture, the batch only the people: per crop the frame
    # is heavier on the wire at 4 people, and both answers are the same size.
    assert frame.request_bytes_per_crop > batch.request_bytes_per_crop
    assert frame.response_bytes_per_crop == pytest.approx(batch.response_bytes_per_crop, rel=0.2)


def test_the_forward_probe_times_the_model_between_runs(tiny_model_dir: Path) -> None:
    """The compare tool's in-process ceiling: loaded once, timed again around each run."""
    from load_tests.compare import Round, Run, reachable_size, spread
    from load_tests.concurrency import ForwardProbe

    probe = ForwardProbe(str(tiny_model_dir), "fp32", "torch")
    try:
        first, again = probe.rate(2, 0.2), probe.rate(2, 0.2)
        single = probe.single_ms(0.1)
    finally:
        probe.close()
    assert first > 0
    assert again > 0
    assert single > 0
    run = Run("ours", 1, 10, 0, 1.0, 10.0, 5.0, 9.0, 0.1, 20.0)
    between = Round(1, {"own": 10.0}, {"own": 30.0}, single, run, None)
    assert between.ceiling("own") == 20.0  # the mean of just before and just after
    assert spread([0.9, 1.1, 1.0]) == "1.00 (0.90-1.10)"
    rates = {1: 10.0, 8: 40.0, 16: 30.0, 32: 50.0}
    assert reachable_size(rates, 16) == 8  # 32 is faster, but 16 clients never fill it
    assert reachable_size(rates, 1) == 1


def test_the_compare_tool_reads_the_services_own_forward_passes(server: RunningServer) -> None:  # noqa: F811
    from load_tests.compare import Round, Run, served_totals

    before = served_totals(server.url)
    files = [("images", (f"{i}.jpg", noise_jpeg(5 + i))) for i in range(3)]
    reply = httpx.post(f"{server.url}/embed/batch", files=files)
    assert reply.status_code == 200
    run = served_totals(server.url) - before
    assert run.passes >= 1
    assert run.images == 3  # every image counted once, however the batcher split them
    assert 0 < run.pass_ms < 60_000
    assert 1 <= run.mean_batch <= 3
    seconds = run.forward_seconds * 4
    wrk = Run("ours", 1, 1, 0, seconds, 1.0, 5.0, 9.0, 0.1, 20.0)
    assert Round(1, {}, {}, 1.0, wrk, None, run).model_busy == pytest.approx(0.25)


def test_the_ab_tool_pairs_two_configurations_slice_by_slice(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_wrk()
    from load_tests.ab import main as ab_main

    out = tmp_path / "ab.json"
    slices = ab_main(
        ["--model-dir", str(tiny_model_dir), "--b", "CLIP_MAX_BATCH_SIZE=1", "--clients", "4",
         "--rounds", "2", "--seconds", "1", "--port", str(free_port()), "--json", str(out)]
    )  # fmt: skip
    for name in ("A", "B"):
        assert len(slices[name]) == 2
        for piece in slices[name]:
            assert piece.run.non_200 == 0
            assert piece.run.crops_per_s > 0
            assert piece.served.images > 0
            # Busy time summed over the passes that run at once (OpenVINO's streams, at
            # most one per core by default); the last pass may end after the slice.
            assert 0 < piece.model_busy <= (os.cpu_count() or 1) + 0.5
    # B's setting reached B's server and only B's: it never batched two images.
    assert all(piece.served.mean_batch == 1 for piece in slices["B"])
    assert "B / A, per round: crops/s" in capsys.readouterr().out
    assert json.loads(out.read_text())["B"]["settings"] == {"CLIP_MAX_BATCH_SIZE": "1"}


def test_the_ab_tool_refuses_what_is_not_a_setting() -> None:
    from load_tests.compare import parse_settings as settings

    assert settings(["CLIP_MAX_WAIT_MS=25", "CLIP_X=a=b"]) == {
        "CLIP_MAX_WAIT_MS": "25",
        "CLIP_X": "a=b",
    }
    with pytest.raises(SystemExit, match="CLIP_NAME=value"):
        settings(["MAX_WAIT=25"])
    with pytest.raises(SystemExit, match="CLIP_NAME=value"):
        settings(["CLIP_MAX_WAIT_MS"])


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (["--clients", "x"], "--clients 'x': comma-separated whole numbers"),
        (["--endpoints", "embed,nope"], "--endpoints: nope unknown; choose from embed"),
    ],
)
def test_the_concurrency_tool_refuses_bad_options_before_any_load(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    arguments: list[str],
    says: str,
) -> None:
    from load_tests.concurrency import main

    # Not this test process's SIGTERM handler: the tool's own, for its own process.
    monkeypatch.setattr("load_tests.concurrency.start_load_tool", lambda: None)

    with pytest.raises(SystemExit) as caught:
        main(["--url", f"http://127.0.0.1:{free_port()}", *arguments, "--no-ceiling"])
    assert caught.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("concurrency", ["--clients", "1", "--seconds", "1", "--no-ceiling"]),
        ("soak", ["--minutes", "0.01", "--warmup-s", "1"]),
    ],
)
def test_a_load_tool_says_when_nothing_answers_at_its_url(
    monkeypatch: pytest.MonkeyPatch, tool: str, arguments: list[str]
) -> None:
    module = importlib.import_module(f"load_tests.{tool}")
    # Not this test process's SIGTERM handler: the tool's own, for its own process.
    monkeypatch.setattr(module, "start_load_tool", lambda: None)

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit, match=f"no CLIP service answers at {url}"):
        module.main(["--url", url, *arguments])


def test_the_memory_tool_reads_a_configuration_warm_and_cold(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    require_wrk()
    from load_tests.memory import main as memory_main

    out = tmp_path / "memory.json"
    memory_main(
        ["--model-dir", str(tiny_model_dir), "CLIP_MAX_BATCH_SIZE=4,CLIP_MAX_WAIT_MS=2",
         "--cold", "--clients", "2", "--seconds", "1", "--port", str(free_port()),
         "--json", str(out)]
    )  # fmt: skip
    figures = json.loads(out.read_text())
    assert [(f["configuration"], f["cache"]) for f in figures] == [
        ("CLIP_MAX_BATCH_SIZE=4,CLIP_MAX_WAIT_MS=2", "warm"),
        ("CLIP_MAX_BATCH_SIZE=4,CLIP_MAX_WAIT_MS=2", "cold"),
    ]
    for footprint in figures:
        assert footprint["crops_per_s"] > 0
        # The high-water mark is the process's whole life's, so never below a reading.
        assert footprint["peak_mib"] >= max(footprint["ready_mib"], footprint["steady_mib"]) > 50
    with pytest.raises(SystemExit, match="CLIP_NAME=value"):
        memory_main(["--model-dir", str(tiny_model_dir), "BACKEND=torch"])


def test_the_overhead_tool_serves_the_app_around_a_free_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # It builds the app with its own encoder factory: a change to the factory's
    # signature once left the tool unable to start, with no test to say so.
    require_wrk()
    from load_tests.overhead import main as overhead_main

    out = tmp_path / "overhead.json"
    overhead_main(
        ["--model-dir", str(tiny_model_dir), "--clients", "2", "--batch-images", "3",
         "--seconds", "1", "--port", str(free_port()), "--json", str(out)]
    )  # fmt: skip
    runs = {run["endpoint"]: run for run in json.loads(out.read_text())}
    assert set(runs) == {"/embed", "/embed/batch x3"}
    for run in runs.values():
        assert run["requests"] > 0
        assert run["non_200"] == 0
        assert run["server_cpu_ms_per_request"] > 0
    assert runs["/embed/batch x3"]["crops_per_request"] == 3


def test_a_load_tool_killed_with_sigterm_still_stops_what_it_started(tmp_path: Path) -> None:
    """A cancelled CI job or `timeout` sends SIGTERM: the tools' finally blocks, which
    stop their servers (the LitServe peer in its own session), must still run. And what
    a tool prints reaches a pipe as it is printed, not when the tool ends."""
    marker = tmp_path / "stopped"
    script = (
        "import sys, time\n"
        "from load_tests.concurrency import start_load_tool\n"
        "start_load_tool()\n"
        "try:\n"
        "    print('running')\n"  # no flush: the tool's setup makes stdout line-buffered
        "    time.sleep(60)\n"
        "finally:\n"
        f"    open({str(marker)!r}, 'w').write('yes')\n"
    )
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=buffered
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "running"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert marker.read_text() == "yes"


FAKE_SERVICE = """
import os, sys, time, http.server, pathlib

# A checkout whose `python -m app` takes {warm_s} s to be ready on a cache it converted
# into before, {cold_s} s on an empty one, then answers 200 to everything.
cache = pathlib.Path(os.environ["CLIP_CACHE_DIR"])
cache.mkdir(parents=True, exist_ok=True)
converted = cache / "converted-{name}"
time.sleep({warm_s} if converted.exists() else {cold_s})
converted.touch()


class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


port = int(sys.argv[sys.argv.index("--port") + 1])
http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
"""


def fake_checkout(folder: Path, name: str, warm_s: float, cold_s: float) -> Path:
    (folder / "app").mkdir(parents=True)
    (folder / "app" / "__init__.py").write_text("")
    source = FAKE_SERVICE.format(name=name, warm_s=warm_s, cold_s=cold_s)
    (folder / "app" / "__main__.py").write_text(source)
    return folder


def test_the_startup_tool_times_each_checkout_on_a_primed_cache_and_an_empty_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from load_tests.startup import main as startup_main

    this = fake_checkout(tmp_path / "this", "this", warm_s=0.1, cold_s=1.2)
    other = fake_checkout(tmp_path / "other", "other", warm_s=0.3, cold_s=2.4)
    monkeypatch.chdir(this)
    out = tmp_path / "startup.json"
    startup_main(
        ["--model-dir", str(tmp_path), "--rounds", "1", "--against", str(other), "--cold",
         "--port", str(free_port()), "--json", str(out), "CLIP_BACKEND=torch"]
    )  # fmt: skip
    figures = {(f["checkout"], f["cache"]): f["seconds"] for f in json.loads(out.read_text())}
    assert set(figures) == {(str(c), k) for c in (this, other) for k in ("warm", "cold")}
    # Each start is timed to its /ready; warm ones find the cache the first start filled,
    # and every cold one an empty cache of its own.
    expected = {(this, "warm"): 0.1, (this, "cold"): 1.2, (other, "warm"): 0.3,
                (other, "cold"): 2.4}  # fmt: skip
    for (checkout, cache), floor in expected.items():
        seconds = figures[str(checkout), cache]
        assert len(seconds) == 1
        assert all(floor <= s < floor + 1.0 for s in seconds), (checkout, cache, seconds)
    with pytest.raises(SystemExit, match="CLIP_NAME=value"):
        startup_main(["--model-dir", str(tmp_path), "BACKEND=torch"])
