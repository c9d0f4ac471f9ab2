"""`din loadtest` (loadtest.openloop): a real run against the app (bundle + Redis), single steps against
a tiny stdlib HTTP server that answers 503 on purpose, and the find-max search. The search is checked
against deterministic predicates and, driven by real steps, with outcomes that no timing can change:
wall-clock margins on a loaded machine decide nothing here."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from cli import main
from loadtest import openloop
from loadtest.metrics import COUNTERS, PHASES
from loadtest.openloop import find_max, run_step, search
from loadtest.report import StepResult
from loadtest.sampling import Mix
from tests.service.conftest import BundleInfo, LiveServer


class _Handler(BaseHTTPRequestHandler):
    """/rank: 200 with an empty ranking, except every `fail_every`-th request answers 503."""

    fail_every = 0
    lock = threading.Lock()
    count = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(length))
        with self.lock:
            type(self).count += 1
            n = type(self).count
        if self.fail_every and n % self.fail_every == 0:
            self._send(503, b'{"error": "queue full"}')
        else:
            out = {"user_id": body["user_id"], "model_version": "tiny", "items": [], "history_length": 0}
            self._send(200, json.dumps(out).encode())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def tiny_server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"count": 0, "fail_every": 0, "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


MIX = Mix(users=[f"u{i}" for i in range(10)], items=[f"i{k}" for k in range(2, 300)], candidates=10)


def test_loadtest_against_the_app(bundle: BundleInfo, redis_url: str, tmp_path: Path) -> None:
    from tests.service.conftest import make_settings

    client = redis.Redis.from_url(redis_url)
    for u in range(5):
        client.rpush(f"din:hist:u{u}", *[f"i{k}" for k in range(2 + u, 12 + u)])
    client.close()
    users = tmp_path / "users.txt"
    users.write_text("\n".join(f"u{u}" for u in range(5)) + "\n")
    out = tmp_path / "out"
    with LiveServer(make_settings(bundle.path, redis_url)) as live:
        live.wait_ready()
        argv = ["loadtest", "--url", live.url, "--rate", "15", "--duration", "2", "--users-file", str(users)]
        argv += [
            "--bundle",
            str(bundle.path),
            "--candidates",
            "20",
            "--unknown-users",
            "0.2",
            "--out",
            str(out),
        ]
        rc = main(argv)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    result = report["result"]
    assert result["requests"] == 30 and result["ok"] == 30 and result["errors"] == {}
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert result["achieved_rate"] > 10
    phases = {p["metric"]: p for p in result["server"]["phases"]}
    assert phases["din_inference_latency_seconds"]["count"] >= 1
    assert phases["din_request_latency_seconds"]["count"] == 30
    assert phases["din_batch_requests"]["mean"] >= 1
    assert phases["din_redis_latency_seconds"]["mean"] > 0
    assert report["mix"]["users"] == 5 and report["mix"]["items"] == len(bundle.items) - 2
    # Fields present and consistent with each other (nothing here depends on timing).
    assert report["url"] == live.url and "steps" not in report and report["wall_s"] > 0
    assert report["config"]["rate"] == 15 and report["config"]["bundle"] == str(bundle.path)
    assert result["offered_rate"] == 15 and result["duration_s"] == 2 and result["completed"] == 30
    assert result["error_rate"] == 0
    assert set(lat) == {"p50", "p90", "p95", "p99", "min", "mean", "max"} and lat["min"] <= lat["mean"]
    assert set(result["send_lag_ms"]) == set(lat)
    # Every metric the report reads exists on the real server (the names are spelled out in
    # loadtest.metrics, not imported from the service): each phase saw the requests.
    assert [p["metric"] for p in result["server"]["phases"]] == [m for _, m, _, _ in PHASES]
    assert all(p["count"] >= 1 and p["mean"] is not None for p in result["server"]["phases"])
    assert set(result["server"]["counters"]) == set(COUNTERS)
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_counted_by_status(tiny_server: tuple[str, type[_Handler]]) -> None:
    url, handler = tiny_server
    handler.fail_every = 2
    step = asyncio.run(run_step(url, 20.0, 1.0, MIX.payloads(20, seed=1), connections=4))
    assert step.requests == 20 and step.completed == 20
    assert step.ok == 10 and step.errors == {"503": 10}
    assert step.error_rate == pytest.approx(0.5)
    assert step.server is None  # the tiny server has no /metrics
    assert len(step.samples) == 20 and all(lat > 0 for _, lat, _ in step.samples)


def _free_port() -> int:
    """A TCP port nothing listens on (bound once by the OS, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_errors_are_counted() -> None:
    step = asyncio.run(
        run_step(f"http://127.0.0.1:{_free_port()}", 50.0, 0.1, MIX.payloads(5, seed=2), timeout=2)
    )
    assert step.ok == 0 and step.errors == {"connect_error": 5}


def _tried(
    passing: Callable[[float], bool], *, start_rate: float, max_rate: float, bisect_steps: int
) -> tuple[list[float], float | None]:
    """The rates `search` tries when a step at `rate` passes iff `passing(rate)`, and its answer."""
    tried: list[float] = []

    def attempt(rate: float) -> bool:
        tried.append(rate)
        return passing(rate)

    best = search(attempt, start_rate=start_rate, max_rate=max_rate, bisect_steps=bisect_steps)
    return tried, best


def test_search_doubles_then_tries_the_max_rate() -> None:
    tried, best = _tried(lambda r: True, start_rate=20, max_rate=50, bisect_steps=2)
    assert tried == [20, 40, 50] and best == 50
    # The doubling lands on max_rate exactly: not tried twice.
    tried, best = _tried(lambda r: True, start_rate=25, max_rate=100, bisect_steps=3)
    assert tried == [25, 50, 100] and best == 100


def test_search_halves_when_the_first_step_fails() -> None:
    # An objective nothing meets: the first step fails, then it halves three times and gives up.
    tried, best = _tried(lambda r: False, start_rate=20, max_rate=50, bisect_steps=2)
    assert tried == [20, 10, 5, 2.5] and best is None
    # A pass while halving stops the halving, then bisects between it and the failure above.
    tried, best = _tried(lambda r: r <= 6, start_rate=20, max_rate=50, bisect_steps=3)
    assert tried == [20, 10, 5, 7.5, 6.25, 5.625] and best == 5.625


def test_search_bisects_between_the_last_pass_and_the_first_fail() -> None:
    tried, best = _tried(lambda r: r <= 137, start_rate=25, max_rate=5000, bisect_steps=3)
    assert tried == [25, 50, 100, 200, 150, 125, 137.5] and best == 125
    # max_rate itself fails: bisect below it.
    tried, best = _tried(lambda r: r <= 45, start_rate=20, max_rate=50, bisect_steps=2)
    assert tried == [20, 40, 50, 45, 47.5] and best == 45
    # Within 10%: no bisection at all.
    tried, best = _tried(lambda r: r <= 105, start_rate=100, max_rate=108, bisect_steps=3)
    assert tried == [100, 108] and best == 100
    tried, best = _tried(lambda r: r <= 137, start_rate=25, max_rate=5000, bisect_steps=0)
    assert tried == [25, 50, 100, 200] and best == 100


def test_find_max_runs_the_search_with_real_steps(
    tiny_server: tuple[str, type[_Handler]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """find_max drives `search`'s sequence with real steps, keeps every step and picks the best. The
    verdict per step is a function of the rate alone here, so no latency or timing decides it."""
    url, _ = tiny_server
    monkeypatch.setattr(openloop, "passes", lambda step, p99_ms, max_error_rate: step.offered_rate <= 45)
    lines: list[str] = []
    steps, best = asyncio.run(
        find_max(
            url,
            MIX,
            start_rate=20,
            max_rate=50,
            step_duration=0.2,
            p99_ms=50,
            max_error_rate=0.0,
            bisect_steps=2,
            max_requests=9,
            connections=4,
            timeout=5.0,
            seed=0,
            log=lines.append,
        )
    )
    assert [s.offered_rate for s in steps] == [20, 40, 50, 45, 47.5]
    assert best is steps[3]
    # round(rate * step_duration) requests, capped by max_requests; each answered 200 by the tiny server.
    assert [s.requests for s in steps] == [4, 8, 9, 9, 9]
    assert all(s.ok == s.requests and s.errors == {} for s in steps)
    assert [line.split()[-1] for line in lines[1:]] == ["yes", "yes", "NO", "yes", "NO"]
    assert lines[0].split()[0] == "offered/s" and len(lines) == 6


def test_find_max_when_nothing_passes(tiny_server: tuple[str, type[_Handler]]) -> None:
    """The real objective, with a p99 no HTTP round trip can meet: every step fails, whatever the timing."""
    url, _ = tiny_server
    steps, best = asyncio.run(
        find_max(
            url,
            MIX,
            start_rate=20,
            max_rate=50,
            step_duration=0.4,
            p99_ms=1e-6,
            max_error_rate=0.0,
            bisect_steps=2,
            max_requests=100,
            connections=4,
            timeout=2.0,
            seed=0,
            log=lambda *_: None,
        )
    )
    assert [s.offered_rate for s in steps] == [20, 10, 5, 2.5] and best is None
    assert [s.requests for s in steps] == [8, 4, 2, 1]


def test_passes_needs_p99_errors_and_throughput() -> None:
    step = StepResult(offered_rate=100, duration_s=1, requests=100, ok=100, achieved_rate=95.0)
    step.latency_ms = {"p99": 40.0}
    assert openloop.passes(step, p99_ms=50, max_error_rate=0.0)
    assert not openloop.passes(step, p99_ms=30, max_error_rate=0.0)
    step.achieved_rate = 89.0  # fell behind: less than 90% of the offered rate came back
    assert not openloop.passes(step, p99_ms=50, max_error_rate=0.0)
    step.achieved_rate, step.ok = 95.0, 98
    assert not openloop.passes(step, p99_ms=50, max_error_rate=0.01)
    assert openloop.passes(step, p99_ms=50, max_error_rate=0.05)
    assert not openloop.passes(StepResult(offered_rate=1, duration_s=1, requests=0), 50, 1.0)  # no p99
