"""Name lookups for Redis connections that a vanished host cannot clog.

asyncio looks a host name up on the event loop's default thread pool (a handful of threads), once per
connection attempt. A Redis node that is gone (its container stopped: the name is no longer known)
mostly fails its lookup at once, but now and then the lookup waits out the resolver's own timeout
(5 s). Under load every read routed to that node tries to connect, so the few threads soon all wait on
the dead name, and the lookups of the nodes that do answer queue behind them: their connects time out
too (`Timeout connecting to server`), and a Redis Cluster whose replica was promoted in seconds stays
unreadable for as long as the load lasts (measured in the compose `cluster` profile).

`Resolver` looks names up on threads of its own, one lookup per name at a time however many
connections ask (the others wait on that one, each for no longer than its connect timeout), and keeps
each answer a short while: a name that resolves for `ttl_s`, one that does not for `negative_ttl_s`.
A connection that fails forgets its name's address, so a node that comes back on a new address is
found at once. `ResolvingConnection` is redis-py's asyncio connection with its lookups made here
(plain TCP only: TLS checks the certificate against the name, so a `rediss://` connection keeps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from redis.asyncio.connection import Connection

Key = tuple[str, int]


def first_address(host: str, port: int) -> str:
    """The first address the system's resolver gives for `host` (what asyncio would connect to first)."""
    return str(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Resolver:
    """Host name -> address, on threads of its own, one lookup per name at a time, answers kept."""

    def __init__(
        self,
        *,
        ttl_s: float = 5.0,
        negative_ttl_s: float = 1.0,
        workers: int = 8,
        lookup: Callable[[str, int], str] = first_address,
    ) -> None:
        self._resolve = lookup
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="din-resolve")
        self._lock = threading.Lock()
        self._known: dict[Key, tuple[float, str | OSError]] = {}  # expiry (monotonic), address or why not
        self._asking: dict[Key, Future[str]] = {}
        self.lookups = 0  # lookups made (not answers served from what is kept)

    async def address(self, host: str, port: int, timeout: float | None) -> str:
        """An address for `host` (itself when it is one). Raises the lookup's OSError (socket.gaierror)
        or TimeoutError when no answer comes within `timeout` (the lookup goes on, for the next ask)."""
        if _is_address(host):
            return host
        key = (host, port)
        with self._lock:
            known = self._known.get(key)
            if known is not None and known[0] > time.monotonic():
                return _answer(known[1])
            asking = self._asking.get(key)
            if asking is None:
                asking = self._asking[key] = self._executor.submit(self._lookup, key)
                self.lookups += 1
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[str] = loop.create_future()
        asking.add_done_callback(lambda done: _deliver(loop, waiter, done))
        return await asyncio.wait_for(waiter, timeout)

    def forget(self, host: str, port: int) -> None:
        """Drop what is kept for `host` (a connection to it failed: the next one looks it up again)."""
        with self._lock:
            self._known.pop((host, port), None)

    def _lookup(self, key: Key) -> str:
        host, port = key
        try:
            found: str | OSError = self._resolve(host, port)
            ttl = self.ttl_s
        except OSError as exc:
            found, ttl = exc, self.negative_ttl_s
        with self._lock:
            self._known[key] = (time.monotonic() + ttl, found)
            self._asking.pop(key, None)
        return _answer(found)


def _answer(found: str | OSError) -> str:
    if isinstance(found, OSError):
        raise found
    return found


def _deliver(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[str], done: Future[str]) -> None:
    """Hand a lookup's outcome to one waiter on its loop (a waiter that gave up, or a loop that is
    closed, is skipped: nothing is left unretrieved)."""

    def settle() -> None:
        if waiter.done():
            return
        exc = done.exception()
        if exc is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(done.result())

    with contextlib.suppress(RuntimeError):  # the loop is closed
        loop.call_soon_threadsafe(settle)


RESOLVER = Resolver()  # one per process: every connection's lookups share its threads and answers


class ResolvingConnection(Connection):
    """redis-py's asyncio TCP connection, its host name looked up by `resolver` (the process's one)."""

    resolver = RESOLVER

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._address: str | None = None

    def _connection_arguments(self) -> Mapping[str, Any]:
        args = dict(super()._connection_arguments())
        if self._address is not None:
            args["host"] = self._address
        return args

    async def _connect(self) -> None:
        self._address = await self.resolver.address(self.host, self.port, self.socket_connect_timeout)
        try:
            await super()._connect()
        except BaseException:
            self.resolver.forget(self.host, self.port)
            raise
