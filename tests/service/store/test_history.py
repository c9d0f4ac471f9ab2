"""HistoryStore against a real redis-server: round trips, ordering, trimming, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from model.errors import StoreUnavailable
from service.store.client import RedisConfig, async_client
from service.store.embedded import EmbeddedRedis, free_port
from service.store.history import HistoryStore


def _client(url: str, timeout: float = 2.0):
    return async_client(url, RedisConfig(connect_timeout_s=timeout, timeout_s=timeout, max_connections=8))


def _run(coro):
    return asyncio.run(coro)


def test_key_uses_prefix(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        try:
            assert HistoryStore(client).key("u1") == "din:hist:u1"
            assert HistoryStore(client, prefix="x:").key("u1") == "x:hist:u1"
        finally:
            await client.aclose()

    _run(go())


def test_append_then_read_newest_first(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        store = HistoryStore(client)
        try:
            written = await store.append_events([("u1", "a"), ("u2", "x"), ("u1", "b"), ("u1", "c")], 100)
            assert written == 4
            assert await store.get_histories(["u1", "u2"], 100) == [["c", "b", "a"], ["x"]]
            await store.append_events([("u1", "d")], 100)
            assert await store.get_histories(["u1"], 100) == [["d", "c", "b", "a"]]
            # the same list the contract describes: LPUSH order, visible to any Redis client
            assert await client.lrange("din:hist:u1", 0, -1) == ["d", "c", "b", "a"]
        finally:
            await client.aclose()

    _run(go())


def test_trims_to_max_history(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        store = HistoryStore(client)
        try:
            await store.append_events([("u", str(i)) for i in range(10)], 3)
            assert await store.get_histories(["u"], 3) == [["9", "8", "7"]]
            assert await client.llen("din:hist:u") == 3
            await store.append_events([("u", "10")], 3)
            assert await store.get_histories(["u"], 3) == [["10", "9", "8"]]
        finally:
            await client.aclose()

    _run(go())


def test_read_limits_to_max_history_even_if_list_is_longer(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        try:
            await client.rpush("din:hist:u", *[str(i) for i in range(10)])
            assert await HistoryStore(client).get_histories(["u"], 4) == [["0", "1", "2", "3"]]
        finally:
            await client.aclose()

    _run(go())


def test_unknown_users_and_empty_inputs(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        store = HistoryStore(client)
        try:
            assert await store.get_histories([], 100) == []
            assert await store.append_events([], 100) == 0
            await store.append_events([("known", "i1")], 100)
            assert await store.get_histories(["nobody", "known", "nobody"], 100) == [[], ["i1"], []]
        finally:
            await client.aclose()

    _run(go())


def test_many_users_in_one_pipeline(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        store = HistoryStore(client, prefix="t:")
        try:
            events = [(f"user{u}", f"item{u}-{i}") for i in range(7) for u in range(500)]
            assert await store.append_events(events, 5) == len(events)
            users = [f"user{u}" for u in range(500)] + ["missing"]
            histories = await store.get_histories(users, 5)
            assert len(histories) == 501
            for u in range(500):
                assert histories[u] == [f"item{u}-{i}" for i in (6, 5, 4, 3, 2)]
            assert histories[-1] == []
        finally:
            await client.aclose()

    _run(go())


def test_unix_socket_url(tmp_path: Path) -> None:
    async def go(url: str) -> None:
        client = _client(url)
        store = HistoryStore(client)
        try:
            assert await store.ping()
            await store.append_events([("u", "a"), ("u", "b")], 100)
            assert await store.get_histories(["u"], 100) == [["b", "a"]]
        finally:
            await client.aclose()

    with EmbeddedRedis(tmp_path / "r") as server:
        assert server.url.startswith("unix://")
        _run(go(server.url))


@pytest.fixture
def stopped_server(tmp_path: Path) -> Iterator[str]:
    """The URL of a server that was running and is now stopped."""
    server = EmbeddedRedis(tmp_path / "gone", port=0, unix_socket=False)
    server.start()
    url = server.url
    server.stop()
    yield url


def test_unavailable_when_server_stopped(stopped_server: str) -> None:
    async def go() -> None:
        client = _client(stopped_server, timeout=0.5)
        store = HistoryStore(client)
        try:
            assert await store.ping() is False
            with pytest.raises(StoreUnavailable):
                await store.get_histories(["u"], 100)
            with pytest.raises(StoreUnavailable):
                await store.append_events([("u", "a")], 100)
        finally:
            await client.aclose()

    _run(go())


def test_unavailable_when_server_dies_under_a_live_client(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "dies", port=0, unix_socket=False)
    server.start()
    try:

        async def go() -> None:
            client = _client(server.url, timeout=0.5)
            store = HistoryStore(client)
            try:
                await store.append_events([("u", "a")], 100)
                assert await store.get_histories(["u"], 100) == [["a"]]
                server.stop()
                with pytest.raises(StoreUnavailable):
                    await store.get_histories(["u"], 100)
                assert await store.ping() is False
            finally:
                await client.aclose()

        _run(go())
    finally:
        server.stop()


def test_unavailable_on_closed_port() -> None:
    async def go() -> None:
        client = _client(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3)
        try:
            with pytest.raises(StoreUnavailable):
                await HistoryStore(client).get_histories(["u"], 100)
        finally:
            await client.aclose()

    _run(go())


def test_redis_error_reply_is_store_unavailable(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        store = HistoryStore(client)
        try:
            await client.set("din:hist:bad", "not a list")
            with pytest.raises(StoreUnavailable):
                await store.append_events([("bad", "x")], 100)
        finally:
            await client.aclose()

    _run(go())


# ------------------------------------------------------------------ reads, per user


def test_a_wrong_typed_key_fails_its_user_alone(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        store = HistoryStore(client)
        try:
            await store.append_events([("a", "i1"), ("c", "i3")], 100)
            await client.set("din:hist:b", "not a list")
            got = await store.get_histories(["a", "b", "c", "nobody"], 100)
            assert got[0] == ["i1"] and got[2] == ["i3"] and got[3] == []
            assert isinstance(got[1], StoreUnavailable) and "din:hist:b" in str(got[1])
        finally:
            await client.aclose()

    _run(go())
