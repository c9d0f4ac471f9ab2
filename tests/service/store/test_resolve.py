"""Host name lookups for Redis connections (service.store.resolve): a name whose lookup hangs holds one
thread and its own askers, never the connects to names that resolve; answers are kept a short while;
the clients' TCP connections (single Redis and every cluster node) look their names up there."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest
import redis.asyncio as aioredis

from service.store.client import RedisConfig, async_client
from service.store.history import HistoryStore
from service.store.resolve import Resolver, ResolvingConnection
from tests.redis_cluster import cluster_url as cluster_url  # fixtures
from tests.redis_cluster import redis_cluster as redis_cluster


class Names:
    """A resolver's lookups: `gone` hangs until released (a lookup waiting out the resolver's own
    timeout), then fails as a vanished container's name does; `missing` fails at once; others answer."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, host: str, port: int) -> str:
        with self.lock:
            self.asked.append(host)
        if host == "gone":
            self.release.wait(30)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host == "missing":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return "127.0.0.1"


def test_a_hanging_lookup_holds_one_thread_and_never_the_names_that_answer() -> None:
    names = Names()
    resolver = Resolver(workers=2, lookup=names)

    async def go() -> None:
        # 50 connects to the vanished node, each giving up after 50 ms, as connects under load do
        gone = await asyncio.gather(
            *(resolver.address("gone", 6379, 0.05) for _ in range(50)), return_exceptions=True
        )
        assert all(isinstance(g, TimeoutError) for g in gone)
        # with asyncio's own lookups these would queue behind the hung ones (2 threads here)
        assert await resolver.address("node-5", 6379, 1.0) == "127.0.0.1"
        assert await resolver.address("node-6", 6379, 1.0) == "127.0.0.1"

    try:
        asyncio.run(go())
    finally:
        names.release.set()
    assert names.asked.count("gone") == 1  # one lookup however many asked
    assert resolver.lookups == 3


def test_answers_are_kept_and_a_failed_connection_forgets_its_name() -> None:
    names = Names()
    resolver = Resolver(lookup=names)

    async def go() -> None:
        for _ in range(3):
            assert await resolver.address("node-1", 6379, 1.0) == "127.0.0.1"
        assert names.asked == ["node-1"]
        for _ in range(2):  # a name that does not resolve is kept too (negative_ttl_s)
            with pytest.raises(socket.gaierror):
                await resolver.address("missing", 6379, 1.0)
        assert names.asked == ["node-1", "missing"]
        resolver.forget("node-1", 6379)
        assert await resolver.address("node-1", 6379, 1.0) == "127.0.0.1"
        assert names.asked == ["node-1", "missing", "node-1"]
        assert await resolver.address("10.1.2.3", 6379, 1.0) == "10.1.2.3"  # an address is not looked up
        assert await resolver.address("::1", 6379, 1.0) == "::1"

    asyncio.run(go())


def test_answers_expire() -> None:
    names = Names()
    resolver = Resolver(ttl_s=0.0, negative_ttl_s=0.0, lookup=names)

    async def go() -> None:
        await resolver.address("node-1", 6379, 1.0)
        await resolver.address("node-1", 6379, 1.0)

    asyncio.run(go())
    assert names.asked == ["node-1", "node-1"]


def _resolving(resolver: Resolver) -> type[ResolvingConnection]:
    return type("Counted", (ResolvingConnection,), {"resolver": resolver})


def test_a_single_redis_client_connects_through_the_resolver(redis_url: str) -> None:
    url = redis_url.replace("127.0.0.1", "localhost")
    names: list[str] = []
    resolver = Resolver(lookup=lambda host, port: names.append(host) or "127.0.0.1")

    async def go() -> None:
        client = async_client(url, RedisConfig(url=url, connect_timeout_s=2, timeout_s=2))
        assert isinstance(client, aioredis.Redis)
        assert client.connection_pool.connection_class is ResolvingConnection
        client.connection_pool.connection_class = _resolving(resolver)
        try:
            assert await asyncio.gather(*(client.ping() for _ in range(8)))  # several connections
        finally:
            await client.aclose()

    asyncio.run(go())
    assert names == ["localhost"]  # looked up once for all of them


def test_a_name_that_does_not_resolve_is_a_connection_error_naming_it() -> None:
    url = "redis://missing:6379/0"

    async def go() -> Any:
        client = async_client(url, RedisConfig(url=url, connect_timeout_s=2, timeout_s=2))
        client.connection_pool.connection_class = _resolving(Resolver(lookup=Names()))
        try:
            with pytest.raises(aioredis.ConnectionError, match=r"missing:6379.*not known"):
                await client.ping()
        finally:
            await client.aclose()

    asyncio.run(go())


def test_every_cluster_node_connects_through_the_resolver(cluster_url: str) -> None:
    cfg = RedisConfig(url=cluster_url, cluster=True, connect_timeout_s=2, timeout_s=2)

    async def go() -> set[type]:
        client = async_client(cluster_url, cfg)
        store = HistoryStore(client)
        try:
            await store.get_histories([f"user-{k}" for k in range(30)], 5)
            nodes = client.nodes_manager.nodes_cache.values()
            assert len(nodes) == 6
            return {type(conn) for node in nodes for conn in node._connections}
        finally:
            await store.aclose()
            await client.aclose()

    assert asyncio.run(go()) == {ResolvingConnection}
