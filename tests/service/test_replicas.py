"""Several `din serve` processes behind a round-robin TCP proxy on loopback, sharing one Redis: the
service keeps no state of its own, so an event written through one replica is seen by the next rank
through another."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service.conftest import BundleInfo, start_serve, stop_serve

REPLICAS = 3


class RoundRobinProxy:
    """A TCP load balancer: each new connection goes to the next upstream; `served` records which."""

    def __init__(self, upstreams: list[str]) -> None:
        self.upstreams = [(urlsplit(u).hostname or "127.0.0.1", urlsplit(u).port or 80) for u in upstreams]
        self._next = itertools.cycle(range(len(upstreams)))
        self.served: list[int] = []  # upstream index of each accepted connection, in order
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []

    def __enter__(self) -> RoundRobinProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        for t in self._threads:
            t.join(timeout=5)
        for sk in [self._listener, *self._socks]:
            sk.close()

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            k = next(self._next)
            self.served.append(k)
            upstream = socket.create_connection(self.upstreams[k])
            self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._spawn(self._pump, a, b)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.1)
        with contextlib.suppress(OSError):
            while not self._closing.is_set():
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


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
    with replicas(bundle, redis_url, REPLICAS, tmp_path) as urls, RoundRobinProxy(urls) as lb:
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
