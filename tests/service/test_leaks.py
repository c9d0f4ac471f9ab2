"""Leaks: thousands of /rank requests, a mix of callers that wait, callers that give up mid-request and
requests whose deadline passes during a slow Redis read, leave nothing behind in `din serve`.

Redis sits behind a proxy that, in short windows, delays replies past the request deadline (a whole
batch's read is cut off, its reply arriving later on a connection that must be dropped). The run is cut
in halves; between them and at the end, with the client gone and the service idle:

- the service's Redis connections (CLIENT LIST on the server) are back to the idle pool, never more
  than the pool's size, and the pool still has every connection to give: a burst of users afterwards
  is answered from Redis (a pool whose connections leaked would be exhausted and answer degraded);
- the server process's open file descriptors (/proc/PID/fd) are back within a few of the start;
- its resident memory (/proc/PID/status VmRSS) grows less than 30 MB over the second half.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.service.conftest import BundleInfo, FaultProxy, ServeOutput, start_serve, stop_serve
from tests.service.test_cancellation import abandon
from tests.service.test_faults import Reference, make_histories, own_redis, seed_histories

N_USERS = 20
CANDIDATES = [f"i{k}" for k in range(60, 70)]
WORKERS = 8
WARMUP = 300
HALF = 1500
BUDGET_MS = 150
POOL = 8  # DIN_REDIS_MAX_CONNECTIONS: small, so a leak would exhaust it
RSS_GROWTH_MB = 30
FD_SLACK = 3

pytestmark = pytest.mark.slow


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def redis_clients(url: str) -> int:
    """Connections on the Redis server, this one (running CLIENT LIST) not counted."""
    r = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return sum(1 for c in r.client_list() if c.get("cmd") != "client|list")
    finally:
        r.close()


async def _mix(url: str, users: list[str], n: int, proxy: FaultProxy, seed: int) -> Counter[Any]:
    """`n` requests from WORKERS clients: 2/3 wait for their answer, 1/3 give up at a random moment (a
    cancelled task dropping its connection, or an httpx timeout); meanwhile Redis replies are fast,
    then for a short window slower than the deadline."""
    left = n
    statuses: Counter[Any] = Counter()
    done = asyncio.Event()

    async def flap() -> None:
        while not done.is_set():
            proxy.delay(to_client=0.001)
            await asyncio.sleep(0.5)
            proxy.delay(to_client=0.25)  # > the budget: every batch read in this window is cut off
            await asyncio.sleep(0.12)
        proxy.delay(to_client=0.001)

    async def worker(client: httpx.AsyncClient, w: int) -> None:
        nonlocal left
        wrng = random.Random(seed * 100 + w)
        while left > 0:
            left -= 1
            body = {"user_id": wrng.choice(users), "candidates": CANDIDATES}
            mode = wrng.random()
            if mode < 1 / 6:  # a cancelled task drops its connection
                got = await abandon(url, body, wrng.uniform(0.0005, 0.02))
                if got is None:
                    statuses["aborted"] += 1
                    continue
                status, answer = got
            else:
                try:  # 1 in 6 with an httpx timeout, the rest wait
                    timeout = wrng.uniform(0.0005, 0.02) if mode < 1 / 3 else 30
                    r = await client.post("/rank", json=body, timeout=timeout)
                except httpx.TimeoutException:
                    statuses["aborted"] += 1
                    continue
                status, answer = r.status_code, r.json()
            statuses[status if status != 503 else f"503 {answer.get('reason')}"] += 1

    limits = httpx.Limits(max_connections=WORKERS, max_keepalive_connections=WORKERS)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        flapping = asyncio.create_task(flap())
        await asyncio.gather(*(worker(client, w) for w in range(WORKERS)))
        done.set()
        await flapping
    return statuses


def _settle(pid: int, redis_url: str, fd_limit: int, timeout: float = 15.0) -> tuple[int, int]:
    """Wait (bounded) for the idle state: fds at most `fd_limit` and at most POOL Redis connections."""
    deadline = time.monotonic() + timeout
    while True:
        n_fds, n_redis = fds(pid), redis_clients(redis_url)
        if (n_fds <= fd_limit and n_redis <= POOL) or time.monotonic() > deadline:
            return n_fds, n_redis
        time.sleep(0.1)


def test_thousands_of_aborted_and_timed_out_requests_leak_nothing(bundle: BundleInfo, tmp_path: Path) -> None:
    histories = make_histories(N_USERS, seed=4, items=bundle.items)
    ref = Reference(bundle, histories, CANDIDATES)
    users = list(histories)
    with own_redis(tmp_path / "redis") as server, FaultProxy(server.url) as proxy:
        seed_histories(server.url, histories)
        proc, url = start_serve(
            "--bundle", str(bundle.path), "--redis-url", proxy.url, "--shutdown-drain-s", "0",
            "--intra-op-threads", "1", "--log-level", "WARNING",
            "--request-timeout-ms", str(BUDGET_MS), "--redis-timeout-ms", "5000",
            "--redis-max-connections", str(POOL),
        )  # fmt: skip
        out = ServeOutput(proc)
        try:
            pid = proc.pid
            warm = asyncio.run(_mix(url, users, WARMUP, proxy, seed=1))
            fds0, redis0 = _settle(pid, server.url, fd_limit=0, timeout=1.0)  # the idle state, as it is
            first = asyncio.run(_mix(url, users, HALF, proxy, seed=2))
            fds1, redis1 = _settle(pid, server.url, fd_limit=fds0 + FD_SLACK)
            rss1 = rss_mb(pid)
            second = asyncio.run(_mix(url, users, HALF, proxy, seed=3))
            fds2, redis2 = _settle(pid, server.url, fd_limit=fds0 + FD_SLACK)
            rss2 = rss_mb(pid)

            # The pool still has all its connections to give: a burst of every user, read from Redis.
            async def burst() -> list[tuple[str, httpx.Response]]:
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    rs = await asyncio.gather(
                        *(client.post("/rank", json={"user_id": u, "candidates": CANDIDATES}) for u in users)
                    )
                    return list(zip(users, rs, strict=True))

            personal: set[str] = set()
            for _ in range(20):  # a loaded machine may shed a few: ask again
                for user, r in asyncio.run(burst()):
                    if r.status_code == 200:
                        ref.check(user, r.json())
                        if not r.json()["degraded"]:
                            personal.add(user)
                    else:
                        assert r.status_code == 503 and r.json()["error"] == "overloaded", r.text
                if len(personal) == len(users):
                    break
            assert proc.poll() is None, f"din serve died\n{out.tail()}"
        finally:
            stop_serve(proc)
            out.close()

    report = (
        f"fds {fds0} -> {fds1} -> {fds2}, redis connections {redis0} -> {redis1} -> {redis2}, "
        f"RSS {rss1:.1f} -> {rss2:.1f} MB; statuses {warm} {first} {second}"
    )
    for statuses in (first, second):
        assert set(statuses) <= {200, "503 timeout", "503 deadline", "503 queue_full", "aborted"}, report
        assert statuses["aborted"] >= 50 and statuses["503 timeout"] >= 1 and statuses[200] >= 300, report
    assert len(personal) == len(users), f"degraded after the run: {sorted(set(users) - personal)}; {report}"
    assert fds1 <= fds0 + FD_SLACK and fds2 <= fds0 + FD_SLACK, report
    assert redis1 <= POOL and redis2 <= POOL, report
    assert rss2 - rss1 < RSS_GROWTH_MB, report
