"""Overload, end to end: `din serve` offered several times its capacity keeps serving at about its
capacity, sheds the rest with 503 overloaded + Retry-After (most at the door, at once), and never
sends a 200 after the request's deadline.

Real process, real HTTP, one request shape that is expensive on purpose (all 298 items against a full
100-item history) so the service saturates at a rate this test's client can easily exceed. Lateness is
judged from the server's own access log (arrival to answer, per request): the client runs on the same
cores, and its own delays (connection set-up, scheduling) are not the server's.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import orjson
import pytest

from loadtest.closedloop import run_closed
from tests.service.conftest import BundleInfo, make_bundle, start_serve

BUDGET_MS = 250.0
SLACK_MS = 50.0  # from handing the answer to the socket to the access log line

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle_t100(bundle: BundleInfo, tmp_path_factory: pytest.TempPathFactory) -> BundleInfo:
    """The session bundle's model (its traced graphs reused) with T = 100."""
    path = tmp_path_factory.mktemp("bundle") / "bundle"
    return make_bundle(path, seed=7, version="t100", max_history=100, graphs_of=bundle)


async def _open_loop(url: str, body: bytes, rate: float, seconds: float) -> list[tuple[int, dict]]:
    """Send at a constant rate whatever the answers; (status, body of a non-200)."""
    out: list[tuple[int, dict]] = []
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one() -> None:
            r = await client.post("/rank", content=body, headers={"content-type": "application/json"})
            out.append((r.status_code, r.json() if r.status_code != 200 else {}))

        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return out


def test_overload_sheds_fast_and_keeps_goodput(
    bundle_t100: BundleInfo, redis_url: str, tmp_path: Path
) -> None:
    items = bundle_t100.items[2:]
    body = orjson.dumps({"user_id": "u", "candidates": items, "history": items[:100]})
    log = tmp_path / "serve.log"
    args = ["--bundle", str(bundle_t100.path), "--redis-url", redis_url, "--log-json"]
    proc, url = start_serve(*args, "--request-timeout-ms", str(BUDGET_MS), log=log)
    try:
        # capacity: answers per second with a couple of requests always waiting (a busy machine may
        # shed some of them already; what counts is what gets answered)
        closed = asyncio.run(run_closed(url, [body], connections=2, duration=3.0))
        capacity = closed.throughput
        assert capacity > 2 and set(closed.errors) <= {"503"}, closed
        mark = log.stat().st_size
        seconds = 4.0
        answers = asyncio.run(_open_loop(url, body, rate=3 * capacity, seconds=seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    statuses = {s for s, _ in answers}
    assert statuses <= {200, 503}, statuses
    shed = [b for s, b in answers if s == 503]
    assert shed, "3x capacity offered, nothing shed"
    reasons = {b["error"]: b["reason"] for b in shed}
    assert set(reasons) == {"overloaded"} and set(reasons.values()) <= {"deadline", "timeout", "queue_full"}
    goodput = sum(1 for s, _ in answers if s == 200) / seconds
    assert goodput >= 0.5 * capacity, f"goodput {goodput:.0f}/s at 3x a capacity of {capacity:.0f}/s"

    with open(log) as f:
        f.seek(mark)
        records = [json.loads(line) for line in f if line.startswith("{")]
    served = [r for r in records if r.get("path") == "/rank" and "duration_ms" in r]
    assert len(served) >= len(answers)
    ok_ms = [r["duration_ms"] for r in served if r["status"] == 200]
    late = [ms for ms in ok_ms if ms > BUDGET_MS + SLACK_MS]
    assert not late, f"{len(late)} answers of 200 after the deadline, the latest at {max(late):.0f} ms"
    # shed at the door, not after waiting: most refusals are judged on arrival and take milliseconds
    at_door = sum(1 for b in shed if b["reason"] == "deadline")
    assert at_door >= len(shed) / 2, {
        r: sum(1 for b in shed if b["reason"] == r) for r in ("deadline", "timeout")
    }
    # The fastest quarter of the refusals: at once, with no wait for the work ahead. A few ms on an idle
    # machine; on cores shared with other work every answer of this run stretches alike, so the bound is
    # the fastest 200 of the same run (one inference, little or no queue): a refusal that waited in the
    # queue, or ran the model, takes at least that long and fails. (A quarter of it, the bound before, was
    # missed by 0.7 ms once on a busy two-core CI box: 10.7 ms refusals against a fastest answer of 17.9.)
    shed_ms = sorted(r["duration_ms"] for r in served if r["status"] == 503)
    quick, fastest_ok = shed_ms[len(shed_ms) // 4], min(ok_ms)
    assert quick < max(10.0, fastest_ok), (quick, fastest_ok)
