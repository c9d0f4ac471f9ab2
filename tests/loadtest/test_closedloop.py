"""The lean load runners (loadtest.closedloop over loadtest.rawhttp) against a real service."""

from __future__ import annotations

import asyncio

import orjson

from loadtest.closedloop import run_closed, run_open
from loadtest.rawhttp import RawClient
from tests.service.conftest import BundleInfo, LiveServer, make_settings


def test_closed_and_open_loops_against_a_live_service(bundle: BundleInfo, redis_url: str) -> None:
    bodies = [orjson.dumps({"user_id": f"u{k}", "candidates": ["i2", "i3", f"i{k + 4}"]}) for k in range(10)]
    bad = orjson.dumps({"user_id": "u", "candidates": []})
    # the runners are under test, not shedding: a deadline no busy CI box reaches (3 were shed at 250 ms)
    settings = make_settings(bundle.path, redis_url, keep_alive_timeout_s=0.2, request_timeout_ms=10_000)
    with LiveServer(settings) as server:
        server.wait_ready()
        closed = asyncio.run(run_closed(server.url, bodies, connections=3, duration=1.0))
        assert closed.ok > 10 and closed.requests == closed.ok and not closed.errors
        assert closed.throughput > 0 and closed.latency_ms["p50"] > 0

        samples = asyncio.run(run_open(server.url, [*bodies, bad], rate=40))
        assert len(samples) == 11
        assert sorted(s for _, _, s in samples) == ["200"] * 10 + ["422"]
        assert [t for t, _, _ in samples] == sorted(t for t, _, _ in samples)

        async def stale() -> list[tuple[int, bytes]]:
            # a kept-alive connection the server closes while idle is retried, not reported as an error
            client = RawClient(server.url, max_connections=1)
            request = client.request_bytes("/rank", bodies[0])
            first = await client.send(request)
            await asyncio.sleep(0.6)  # past the server's keep-alive timeout
            second = await client.send(request)
            await client.close()
            return [first, second]

        answers = asyncio.run(stale())
    assert [status for status, _ in answers] == [200, 200]
    assert orjson.loads(answers[1][1])["user_id"] == "u0"
