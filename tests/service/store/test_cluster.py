"""HistoryStore over a real Redis Cluster (3 masters + 3 replicas on loopback): reads grouped by node,
appends atomic per user with event-id dedup, a whole call refused before anything is written, and a
call that one master refuses halfway says exactly who was written."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot

from contracts.errors import StorePartial, StoreUnavailable
from service.config import Settings
from service.errors import http_status
from service.store.client import RedisConfig, async_client
from service.store.history import Appended, HistoryStore
from service.store.keys import cluster_event_key, event_key, history_key
from tests.redis_cluster import LocalCluster
from tests.redis_cluster import cluster_url as cluster_url  # fixtures
from tests.redis_cluster import redis_cluster as redis_cluster

USERS = [f"user-{k}" for k in range(60)]


def _store(url: str, **kw: Any) -> HistoryStore:
    cfg = RedisConfig(url=url, cluster=True, connect_timeout_s=2, timeout_s=2, **kw)
    return HistoryStore(async_client(url, cfg), read_from_replicas=cfg.read_from_replicas)


async def _close(store: HistoryStore) -> None:
    await store.aclose()
    await store.client.aclose()


@pytest.fixture
def pipelines(monkeypatch: pytest.MonkeyPatch) -> list[tuple[ClusterNode, int]]:
    """Every pipeline sent to a cluster node: (node, commands). The real call goes through."""
    sent: list[tuple[ClusterNode, int]] = []
    real = ClusterNode.execute_pipeline

    async def spy(self: ClusterNode, commands: list[Any]) -> bool:
        sent.append((self, len(commands)))
        return await real(self, commands)

    monkeypatch.setattr(ClusterNode, "execute_pipeline", spy)
    return sent


# ------------------------------------------------------------------ the key layout, the settings


def test_event_markers_share_the_slot_of_their_history_and_single_redis_keys_do_not_change() -> None:
    assert history_key("din:", "u1") == "din:hist:u1" and event_key("din:", "e1") == "din:evt:e1"
    for user in ["u1", "a{b}c", "a}b", "{}x}", "{{}}", "}", "{", "héllo", "x" * 256, ""]:
        for event in ["e1", "{e}", "}"]:
            marker = cluster_event_key("din:", user, event)
            assert key_slot(marker.encode()) == key_slot(history_key("din:", user).encode()), (user, event)
            assert marker.startswith("din:evt:{") and marker.endswith(f"}}:{event}")
    assert cluster_event_key("din:", "u1", "e1") == "din:evt:{din:hist:u1}:e1"


@pytest.mark.parametrize(
    ("kw", "field", "says"),
    [
        ({"redis_cluster": True}, "redis_cluster", "needs a URL"),
        ({"redis_cluster": True, "redis_url": "unix:///tmp/r.sock"}, "redis_cluster", "redis://"),
        (
            {"redis_cluster": True, "redis_url": "redis://h:1", "redis_prefix": "{x}:"},
            "redis_cluster",
            "braces",
        ),
        (
            {"redis_read_from_replicas": True, "redis_url": "redis://h:1"},
            "redis_read_from_replicas",
            "Cluster",
        ),
        ({"redis_cluster_nodes": "h2:1", "redis_url": "redis://h:1"}, "redis_cluster_nodes", "Cluster"),
        (
            {"redis_cluster": True, "redis_url": "redis://h:1", "redis_cluster_nodes": "h2:1, h3"},
            "redis_cluster_nodes",
            "host:port, not 'h3'",
        ),
    ],
)
def test_settings_refuse_a_cluster_that_cannot_work(kw: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, **kw)  # type: ignore[call-arg]
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [(field,)] and says in errors[0]["msg"], errors
    ok = Settings(_env_file=None, redis_cluster=True, redis_url="redis://h:1", redis_read_from_replicas=True)  # type: ignore[call-arg]
    assert ok.redis.cluster and ok.redis.read_from_replicas and ok.redis.cluster_nodes == ()
    kw = {"redis_cluster": True, "redis_url": "redis://h:1", "redis_cluster_nodes": "h2:2, h3:3"}
    more = Settings(_env_file=None, **kw)  # type: ignore[call-arg, arg-type]
    assert more.redis.cluster_nodes == ("h2:2", "h3:3")


# ------------------------------------------------------------------ reads


def test_a_batch_is_read_with_one_pipeline_per_node(
    cluster_url: str, redis_cluster: LocalCluster, pipelines: list[tuple[ClusterNode, int]]
) -> None:
    async def go() -> None:
        store = _store(cluster_url)
        try:
            events = [(u, f"i{k}") for u in USERS for k in range(3)]
            assert await store.append_events(events, 100) == Appended(len(events), 0)
            pipelines.clear()
            got = await store.get_histories([*USERS, "nobody"], 2)
            assert got == [*(["i2", "i1"] for _ in USERS), []]
        finally:
            await _close(store)

    asyncio.run(go())
    masters = {n.port for n in redis_cluster.nodes if n.info("replication")["role"] == "master"}
    assert len(pipelines) == 3 and {int(node.port) for node, _ in pipelines} == masters
    assert sum(n for _, n in pipelines) == len(USERS) + 1


def test_reads_from_replicas(
    cluster_url: str, redis_cluster: LocalCluster, pipelines: list[tuple[ClusterNode, int]]
) -> None:
    async def go() -> None:
        writer, reader = _store(cluster_url), _store(cluster_url, read_from_replicas=True)
        try:
            await writer.append_events([(u, f"x-{u}") for u in USERS], 100)
            await asyncio.to_thread(redis_cluster.wait_replicated)
            pipelines.clear()
            assert await reader.get_histories(USERS, 100) == [[f"x-{u}"] for u in USERS]
        finally:
            await _close(writer)
            await _close(reader)

    asyncio.run(go())
    replicas = {n.port for n in redis_cluster.nodes if n.info("replication")["role"] == "slave"}
    assert len(pipelines) == 3 and {int(node.port) for node, _ in pipelines} == replicas


def test_a_wrong_typed_key_fails_its_user_alone_on_read(cluster_url: str) -> None:
    async def go() -> None:
        store = _store(cluster_url)
        try:
            await store.append_events([("ok", "a")], 100)
            await store.client.set(history_key("din:", "bad"), "x")
            ok, bad = await store.get_histories(["ok", "bad"], 100)
            assert ok == ["a"] and isinstance(bad, StoreUnavailable) and "WRONGTYPE" in bad.message
            assert await store.ping()
        finally:
            await _close(store)

    asyncio.run(go())


def test_a_cluster_no_node_of_which_answers_is_unavailable_not_an_error() -> None:
    """redis-py raises RedisClusterException (not a RedisError) when no startup node can be reached:
    reads and appends must say StoreUnavailable (the service degrades; it answered 500 before), and
    ping says False."""
    from service.store.embedded import free_port

    async def go() -> None:
        store = _store(f"redis://127.0.0.1:{free_port()}")
        try:
            with pytest.raises(StoreUnavailable, match="cannot be connected"):
                await store.get_histories(["u1", "u2"], 100)
            with pytest.raises(StoreUnavailable):
                await store.append_events([("u1", "a")], 100)
            assert await store.ping() is False
        finally:
            await _close(store)

    asyncio.run(go())


def test_a_cluster_whose_url_node_is_down_is_found_through_the_other_nodes(cluster_url: str) -> None:
    """DIN_REDIS_URL names a node that does not answer (down as a replica starts): with the other
    nodes given (DIN_REDIS_CLUSTER_NODES) the client discovers the cluster through them; without,
    it cannot."""
    from service.store.embedded import free_port

    dead = f"redis://127.0.0.1:{free_port()}"
    live = cluster_url.removeprefix("redis://").split("/")[0]

    async def go() -> None:
        alone = _store(dead)
        helped = _store(dead, cluster_nodes=(live,))
        try:
            with pytest.raises(StoreUnavailable, match="cannot be connected"):
                await alone.get_histories(["u1"], 100)
            assert await helped.append_events([("u1", "a"), ("u2", "b")], 100) == Appended(2, 0)
            assert await helped.get_histories(["u1", "u2", "u3"], 100) == [["a"], ["b"], []]
            assert await helped.ping() is True
        finally:
            await _close(alone)
            await _close(helped)

    asyncio.run(go())


# ------------------------------------------------------------------ appends


def test_events_are_atomic_per_user_and_retries_are_written_once(cluster_url: str) -> None:
    async def go() -> None:
        store = _store(cluster_url)
        try:
            events = [(u, f"i-{u}-{k}", f"e-{u}-{k}") for u in USERS[:20] for k in range(3)]
            assert await store.append_events(events, 2) == Appended(60, 0)
            assert await store.append_events(events, 2) == Appended(0, 60)  # a retry: all duplicates
            got = await store.get_histories(USERS[:20], 100)
            assert got == [[f"i-{u}-2", f"i-{u}-1"] for u in USERS[:20]]  # newest first, trimmed to 2
            marker = cluster_event_key("din:", USERS[0], f"e-{USERS[0]}-0")
            assert await store.client.exists(marker) == 1 and 0 < await store.client.ttl(marker) <= 86400
            # An event id is remembered per user in a cluster: the same id for another user is written.
            assert await store.append_events([("other", "z", f"e-{USERS[0]}-0")], 2) == Appended(1, 0)
        finally:
            await _close(store)

    asyncio.run(go())


def test_a_wrong_typed_key_refuses_the_whole_call_before_anything_is_written(cluster_url: str) -> None:
    async def go() -> None:
        store = _store(cluster_url)
        try:
            await store.client.set(history_key("din:", "bad"), "not a list")
            events = [(u, "a", f"e-{u}") for u in USERS[:10]] + [("bad", "x", "e-bad")]
            with pytest.raises(StoreUnavailable, match="nothing was written") as info:
                await store.append_events(events, 100)
            assert history_key("din:", "bad") in info.value.message
            assert await store.get_histories(USERS[:10], 100) == [[] for _ in USERS[:10]]
            assert await store.client.keys("din:evt:*", target_nodes="primaries") == []
        finally:
            await _close(store)

    asyncio.run(go())


def test_a_master_refusing_the_script_gives_a_partial_answer_naming_who_was_written(
    cluster_url: str, redis_cluster: LocalCluster
) -> None:
    refusing = redis_cluster.master_of(history_key("din:", USERS[0]))
    on_it = {u for u in USERS if redis_cluster.master_of(history_key("din:", u)) is refusing}
    events = [(u, f"i-{u}", f"e-{u}") for u in USERS]

    async def go() -> None:
        store = _store(cluster_url)
        try:
            with refusing.client() as c:  # the TYPE check passes there; the scripts are refused (NOPERM)
                c.execute_command("ACL", "SETUSER", "default", "-evalsha", "-eval")
            try:
                with pytest.raises(StorePartial) as info:
                    await store.append_events(events, 100)
            finally:
                with refusing.client() as c:
                    c.execute_command("ACL", "SETUSER", "default", "+@all")
            body = info.value.body()
            assert body["error"] == "store_partial" and http_status(info.value) == 503
            assert set(body["not_written_users"]) == on_it and body["unknown_users"] == []
            assert set(body["written_users"]) == set(USERS) - on_it
            assert body["written"] == len(USERS) - len(on_it) and body["duplicates"] == 0
            assert "NoPermissionError" in info.value.detail and "127.0.0.1" not in info.value.message
            got = dict(zip(USERS, await store.get_histories(USERS, 100), strict=True))
            assert all(got[u] == ([] if u in on_it else [f"i-{u}"]) for u in USERS)
            # The same call again: the users written before are duplicates, the others are written now.
            assert await store.append_events(events, 100) == Appended(len(on_it), len(USERS) - len(on_it))
        finally:
            await _close(store)

    assert 0 < len(on_it) < len(USERS)
    asyncio.run(go())
