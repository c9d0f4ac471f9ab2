"""HistoryStore against a real redis-server: round trips, ordering, trimming, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.errors import StoreTimeout, StoreUnavailable
from service.store.client import RedisConfig, async_client
from service.store.embedded import EmbeddedRedis, free_port
from service.store.history import Appended, HistoryStore
from tests.service.conftest import GatedProxy


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
            assert written.written == 4 and written.duplicates == 0
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
            assert (await store.append_events([], 100)).written == 0
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
            assert (await store.append_events(events, 5)).written == len(events)
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


def test_a_restarted_server_is_read_at_once_through_every_pooled_connection(tmp_path: Path) -> None:
    """Connections pooled before Redis restarted are dead; the first read on each must not degrade.
    Four reads at once fill the pool with four connections; Redis is killed and started again on the
    same port and data; four reads at once then take those four stale connections and must all
    succeed (one immediate retry on a fresh connection), as must everything after."""
    import os
    import signal

    data = tmp_path / "restarts"
    server = EmbeddedRedis(data, port=0, unix_socket=False).start()
    users = [f"u{k}" for k in range(4)]
    try:

        async def go() -> None:
            nonlocal server
            client = _client(server.url, timeout=0.5)
            store = HistoryStore(client)
            try:
                await store.append_events([(u, "a") for u in users], 100)
                await client.config_set("appendfsync", "always")
                await store.append_events([(u, "b") for u in users], 100)
                reads = [store.get_histories([u], 100) for u in users]
                assert await asyncio.gather(*reads) == [[["b", "a"]]] * 4
                assert len(client.connection_pool._available_connections) >= 2  # several pooled
                port = server.port
                assert server.pid is not None
                os.kill(server.pid, signal.SIGKILL)
                server.stop(timeout=5)
                server = EmbeddedRedis(data, port=port, unix_socket=False).start()
                reads = [store.get_histories([u], 100) for u in users]
                assert await asyncio.gather(*reads) == [[["b", "a"]]] * 4
                assert await store.get_histories(users, 100) == [["b", "a"]] * 4
            finally:
                await client.aclose()

        _run(go())
    finally:
        server.stop()


def test_a_redis_that_stopped_answering_is_not_asked_until_a_probe_answers(redis_url: str) -> None:
    """One unanswered read opens the breaker: reads, appends and pings then fail at once, with nothing
    sent (so nothing written); once Redis answers, its background probe closes it within a second."""

    async def go(proxy: GatedProxy) -> None:
        client = _client(proxy.url, timeout=0.3)
        store = HistoryStore(client)
        seen: list[bool] = []
        assert store.breaker is not None
        store.breaker.on_change = seen.append
        try:
            await store.append_events([("u", "a")], 100)
            proxy.hold()
            t0 = time.perf_counter()
            with pytest.raises(StoreUnavailable, match="Timeout"):
                await store.get_histories(["u"], 100)
            assert time.perf_counter() - t0 >= 0.3  # this one waited out the read timeout
            assert store.breaker.open and seen == [False]
            t0 = time.perf_counter()
            with pytest.raises(StoreUnavailable, match="not asked"):
                await store.get_histories(["u"], 100)
            with pytest.raises(StoreUnavailable, match="nothing was written"):
                await store.append_events([("u", "b")], 100)
            assert await store.ping() is False
            assert time.perf_counter() - t0 < 0.1  # none of them waited on Redis
            await asyncio.sleep(1.0)  # the probe keeps failing while Redis does not answer
            assert store.breaker.open and store.breaker.opened == 1
            proxy.release()
            async with asyncio.timeout(3):
                while store.breaker.open:
                    await asyncio.sleep(0.01)
            assert seen == [False, True]
            assert await store.get_histories(["u"], 100) == [["a"]]  # "b" was never sent
            assert await store.ping() is True
        finally:
            await store.aclose()
            await client.aclose()

    with GatedProxy(redis_url) as proxy:
        _run(go(proxy))


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


# ------------------------------------------------------------------ all or nothing, per call


def test_a_wrong_typed_key_writes_nothing_for_any_user(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        store = HistoryStore(client)
        try:
            await store.append_events([("good2", "old")], 100)
            await client.set("din:hist:bad", "not a list")
            events = [("good1", "a", "e1"), ("bad", "x", "e2"), ("good2", "b", None), ("good1", "c", None)]
            with pytest.raises(StoreUnavailable, match="nothing was written") as info:
                await store.append_events(events, 100)
            assert "din:hist:bad" in str(info.value)  # the detail, for the log
            # nothing for anyone: not the good users, not the event ids
            assert await client.exists("din:hist:good1") == 0
            assert await client.lrange("din:hist:good2", 0, -1) == ["old"]
            assert await client.get("din:hist:bad") == "not a list"
            assert await client.keys("din:evt:*") == []
            # fixed on the server side, the same call (same ids) goes through
            await client.delete("din:hist:bad")
            assert await store.append_events(events, 100) == Appended(4, 0)
            assert await client.lrange("din:hist:good1", 0, -1) == ["c", "a"]
            assert await client.lrange("din:hist:good2", 0, -1) == ["b", "old"]
        finally:
            await client.aclose()

    _run(go())


def test_every_wrong_typed_key_is_named(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        store = HistoryStore(client)
        try:
            await client.set("din:hist:s", "x")
            await client.hset("din:hist:h", "f", "v")
            with pytest.raises(StoreUnavailable) as info:
                await store.append_events([("ok", "a"), ("s", "b"), ("h", "c")], 100)
            assert "din:hist:s" in str(info.value) and "din:hist:h" in str(info.value)
            assert "din:hist:ok" not in str(info.value)
            assert await client.exists("din:hist:ok") == 0
        finally:
            await client.aclose()

    _run(go())


# ------------------------------------------------------------------ idempotent events


def test_retried_event_ids_are_written_once(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        store = HistoryStore(client)
        try:
            events = [("u", "a", "e1"), ("u", "b", "e2"), ("v", "c", "e3")]
            assert await store.append_events(events, 100, dedup_ttl_s=600) == Appended(3, 0)
            assert await store.append_events(events, 100, dedup_ttl_s=600) == Appended(0, 3)
            # a retry that adds a new event: only the new one is written
            assert await store.append_events([*events, ("u", "d", "e4")], 100) == Appended(1, 3)
            assert await client.lrange("din:hist:u", 0, -1) == ["d", "b", "a"]
            assert await client.lrange("din:hist:v", 0, -1) == ["c"]
            # the ids are remembered for the dedup window, no longer
            assert 0 < await client.ttl("din:evt:e1") <= 600
            assert await client.get("din:evt:e1") == "1"
        finally:
            await client.aclose()

    _run(go())


def test_duplicates_within_one_call_and_events_without_ids(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        store = HistoryStore(client, prefix="p:")
        try:
            events = [
                ("u", "a", "e1"),
                ("u", "a", "e1"),  # the same event twice in one call
                ("w", "z", "e1"),  # an id names one event, whatever else it carries
                ("u", "b", None),  # no id: always written
                ("u", "b", None),
                ("u", "c"),  # a plain pair, as before ids existed
            ]
            assert await store.append_events(events, 100) == Appended(4, 2)
            assert await client.lrange("p:hist:u", 0, -1) == ["c", "b", "b", "a"]
            assert await client.exists("p:hist:w") == 0
            assert await client.keys("p:evt:*") == ["p:evt:e1"]  # the key layout: prefix, then evt:
            assert await store.append_events([("u", "b", None)], 100) == Appended(1, 0)
        finally:
            await client.aclose()

    _run(go())


def test_an_expired_event_id_is_written_again(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        store = HistoryStore(client)
        try:
            assert await store.append_events([("u", "a", "e1")], 100) == Appended(1, 0)
            await client.delete("din:evt:e1")  # what the TTL does when the window has passed
            assert await store.append_events([("u", "a", "e1")], 100) == Appended(1, 0)
            assert await client.lrange("din:hist:u", 0, -1) == ["a", "a"]
        finally:
            await client.aclose()

    _run(go())


def test_a_long_call_keeps_order_and_trims(redis_url: str) -> None:
    async def go() -> None:
        client = _client(redis_url)
        store = HistoryStore(client)
        try:
            # more events for one user than one LPUSH takes in the script (chunks of 1000)
            events = [("u", f"i{k}", f"e{k}") for k in range(2500)]
            assert await store.append_events(events, 2400) == Appended(2500, 0)
            assert await client.llen("din:hist:u") == 2400
            assert await store.get_histories(["u"], 3) == [["i2499", "i2498", "i2497"]]
            assert (await client.lrange("din:hist:u", -1, -1)) == ["i100"]
        finally:
            await client.aclose()

    _run(go())


def test_bad_arguments() -> None:
    async def go() -> None:
        client = _client(f"redis://127.0.0.1:{free_port()}/0")
        store = HistoryStore(client)
        try:
            with pytest.raises(ValueError, match="max_history"):
                await store.append_events([("u", "a")], 0)
            with pytest.raises(ValueError, match="dedup_ttl_s"):
                await store.append_events([("u", "a")], 10, dedup_ttl_s=0)
        finally:
            await client.aclose()

    _run(go())


# ------------------------------------------------------------------ the ambiguous case: no answer


def test_a_retry_after_an_unanswered_write_does_not_duplicate(redis_url: str) -> None:
    async def go(proxy: GatedProxy) -> None:
        slow = _client(proxy.url, timeout=0.3)
        direct = _client(redis_url)
        store = HistoryStore(slow)
        try:
            # loads the script (so the held call is the EVALSHA that writes, not a NOSCRIPT miss)
            assert await store.append_events([("warm", "w", "w0")], 100) == Appended(1, 0)
            events = [("u", "a", "e1"), ("u", "b", "e2"), ("v", "c", "e3")]
            proxy.hold()  # the script reaches Redis only after the client has given up
            with pytest.raises(StoreTimeout):
                await store.append_events(events, 100)
            assert await direct.exists("din:hist:u") == 0
            proxy.release()
            async with asyncio.timeout(5):  # the late script runs: the write did happen
                while await direct.llen("din:hist:v") == 0:
                    await asyncio.sleep(0.01)
            # Redis did not answer, so the breaker is open: a retry now is refused, nothing sent
            assert store.breaker is not None and store.breaker.open
            with pytest.raises(StoreUnavailable, match="nothing was written: redis down"):
                await store.append_events(events, 100)
            async with asyncio.timeout(5):  # its probe finds Redis answering again
                while store.breaker.open:
                    await asyncio.sleep(0.01)
            # the client's retry with the same ids: nothing twice
            assert await store.append_events(events, 100) == Appended(0, 3)
            assert await direct.lrange("din:hist:u", 0, -1) == ["b", "a"]
            assert await direct.lrange("din:hist:v", 0, -1) == ["c"]
        finally:
            await slow.aclose()
            await direct.aclose()

    with GatedProxy(redis_url) as proxy:
        _run(go(proxy))


def test_no_connection_is_nothing_written_not_unknown(stopped_server: str) -> None:
    async def go() -> None:
        client = _client(stopped_server, timeout=0.5)
        try:
            with pytest.raises(StoreUnavailable, match="ConnectionError"):  # not StoreTimeout
                await HistoryStore(client).append_events([("u", "a", "e1")], 100)
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
