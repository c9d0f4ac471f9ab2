"""`din loadtest` against real servers: the app (bundle + Redis) and a tiny stdlib HTTP server that
answers 503 on purpose, so error counting and the find-max ramp are checked deterministically."""

from __future__ import annotations

import asyncio
import json
import py_compile
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from cli import main
from loadtest.openloop import find_max, run_step
from loadtest.sampling import Mix
from tests.service.conftest import BundleInfo, LiveServer

ROOT = Path(__file__).resolve().parents[2]


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


def test_find_max_ramps_and_stops(tiny_server: tuple[str, type[_Handler]]) -> None:
    url, _ = tiny_server
    kw = dict(step_duration=0.4, max_error_rate=0.0, bisect_steps=2, max_requests=100, connections=4)
    kw |= dict(timeout=2.0, seed=0, log=lambda *_: None)
    steps, best = asyncio.run(find_max(url, MIX, start_rate=20, max_rate=50, p99_ms=500, **kw))  # type: ignore[arg-type]
    assert [s.offered_rate for s in steps] == [20, 40, 50]
    assert best is not None and best.offered_rate == 50
    # An objective nothing meets: the first step fails, then it halves three times and gives up.
    steps, best = asyncio.run(find_max(url, MIX, start_rate=20, max_rate=50, p99_ms=1e-6, **kw))  # type: ignore[arg-type]
    assert [s.offered_rate for s in steps] == [20, 10, 5, 2.5] and best is None


def test_mix_shapes_requests() -> None:
    mix = Mix(
        users=["a"], items=[f"i{k}" for k in range(50)], candidates=8, max_candidates=12, unknown_users=0.5
    )
    bodies = [json.loads(b) for b in mix.payloads(400, seed=3)]
    sizes = [len(b["candidates"]) for b in bodies]
    assert min(sizes) >= 1 and max(sizes) <= 12 and 6 <= sorted(sizes)[200] <= 10
    unknown = sum(b["user_id"] != "a" for b in bodies)
    assert 150 < unknown < 250
    assert all(len(set(b["candidates"])) == len(b["candidates"]) for b in bodies)
    assert mix.payloads(5, seed=3) == mix.payloads(5, seed=3)  # reproducible


def test_locustfile_compiles() -> None:
    py_compile.compile(str(ROOT / "loadtest" / "locustfile.py"), doraise=True)
