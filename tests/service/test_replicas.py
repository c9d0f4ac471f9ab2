"""Several `din serve` processes behind a round-robin TCP proxy (conftest's GatedProxy) on loopback,
sharing one Redis: the service keeps no state of its own, so an event written through one replica
is seen by the next rank through another."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import BundleInfo, GatedProxy, start_serve, stop_serve

REPLICAS = 3


@contextlib.contextmanager
def replicas(bundle: BundleInfo, redis_url: str, n: int, logs: Path) -> Iterator[list[str]]:
    procs, urls = [], []
    try:
        for k in range(n):
            proc, url = start_serve(
                "--bundle", str(bundle.path), "--redis-url", redis_url, "--shutdown-drain-s", "0",
                "--intra-op-threads", "1", log=logs / f"serve-{k}.log",
            )  # fmt: skip
            procs.append(proc)
            urls.append(url)
        yield urls
    finally:
        for proc in procs:
            stop_serve(proc)


@pytest.mark.slow
def test_an_event_written_through_one_replica_is_seen_through_the_next(
    bundle: BundleInfo, redis_url: str, tmp_path: Path
) -> None:
    candidates = bundle.items[2:12]
    with replicas(bundle, redis_url, REPLICAS, tmp_path) as urls, GatedProxy(urls) as lb:
        for k in range(2 * REPLICAS):
            user = f"user-{k}"
            # one connection per request: the proxy sends each to the next replica
            with httpx.Client(base_url=lb.url, timeout=30) as c:
                event = {"events": [{"user_id": user, "item_id": candidates[k % 10], "event_id": f"e-{k}"}]}
                assert c.post("/events", json=event).json() == {"written": 1, "duplicates": 0}
            with httpx.Client(base_url=lb.url, timeout=30) as c:
                r = c.post("/rank", json={"user_id": user, "candidates": candidates})
            assert r.status_code == 200 and r.json()["history_length"] == 1 and not r.json()["degraded"]
            wrote, ranked = lb.served[-2], lb.served[-1]
            assert wrote != ranked  # written through one replica, ranked through another
    assert sorted(set(lb.served)) == list(range(REPLICAS))
