"""Appends to Redis Streams, the impression log's sink: pipelined, trimmed, never retried.

`append_entries(store, entries, maxlen)` sends `XADD key MAXLEN ~ maxlen * record <bytes>` for each
entry (approximate trimming: Redis drops whole macro nodes, so a stream holds `maxlen` entries and at
most one node more, and memory stays bounded). On a single Redis the entries are one pipeline, through
the store's breaker: while it is open nothing is sent, and a Redis that stops answering opens it (the
history reads then fail fast too). On a Redis Cluster each node gets its own pipeline
(`ClusterHistories.send`): a node that fails loses its own entries only.

Per entry the outcome is one of `OUTCOMES`; nothing is ever sent twice (a log that retried forever
would grow without bound behind a Redis that is down, and a retried XADD may duplicate a record).

`StreamWriter` sends the same commands, with the same outcomes, from a thread of its own (the impression
log's writer) over a blocking client of its own, built from the same endpoint and options as the
store's (`service.store.client.sync_client`), so neither the encoding nor the round trips run on the
serving event loop. On a single Redis it follows the store's breaker (open: nothing is sent; a Redis
that cannot be reached opens it, one that answers closes it, each handed to the loop; a reply slower
than the writer's own timeout drops the batch as `unconfirmed` but leaves the breaker alone: the
breaker guards the history reads, and a big pipeline's slowness says little about theirs); on a Redis Cluster
each master gets its own pipeline on a connection of its own, never retried, and a reply that says the
slot map moved (or a node that failed) makes the writer read the topology again before its next batch.
Its connections look host names up in the writer's thread (blocking): a name that stopped resolving
holds up that thread alone (its records are dropped, counted), never the loop nor the store's lookups
(`service.store.resolve`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from contracts.errors import StoreTimeout, StoreUnavailable
from service.store.client import sync_client
from service.store.config import RedisConfig

if TYPE_CHECKING:  # the store imports this module
    from service.store.history import HistoryStore

log = logging.getLogger(__name__)

FIELD = "record"  # each stream entry holds one field: the record, as JSON

WRITTEN = "written"  # Redis confirmed it
REDIS_DOWN = "redis_down"  # not written: Redis not answering (breaker open, no connection)
REDIS_ERROR = "redis_error"  # not written: Redis answered with an error (a key of another type, OOM)
UNCONFIRMED = "unconfirmed"  # sent, no answer in time: it may or may not be in the stream
OUTCOMES = (WRITTEN, REDIS_DOWN, REDIS_ERROR, UNCONFIRMED)


async def append_entries(store: HistoryStore, entries: Sequence[tuple[str, bytes]], maxlen: int) -> list[str]:
    """XADD each `(stream key, record)`, trimming each stream to about `maxlen` entries. Never raises
    for Redis's sake: per entry, one of `OUTCOMES`."""
    if not entries:
        return []
    if store.cluster is not None:
        commands = [("XADD", key, "MAXLEN", "~", maxlen, "*", FIELD, data) for key, data in entries]
        try:
            replies = await store.cluster.send(commands)
        except StoreUnavailable:
            return [REDIS_DOWN] * len(entries)
        return [_outcome(r) for r in replies]
    breaker = store.breaker
    assert breaker is not None
    if breaker.open:
        return [REDIS_DOWN] * len(entries)
    try:
        async with store.client.pipeline(transaction=False) as pipe:
            for key, data in entries:
                pipe.xadd(key, {FIELD: data}, maxlen=maxlen, approximate=True)
            replies = await pipe.execute(raise_on_error=False)
    except RedisTimeoutError as exc:
        breaker.failed(f"{type(exc).__name__}: {exc}")
        return [UNCONFIRMED] * len(entries)
    except (RedisConnectionError, ConnectionError, OSError) as exc:
        breaker.failed(f"{type(exc).__name__}: {exc}")
        return [REDIS_DOWN] * len(entries)
    except RedisError:
        return [REDIS_ERROR] * len(entries)
    breaker.succeeded()
    return [_outcome(r) for r in replies]


def _outcome(reply: object) -> str:
    if isinstance(reply, StoreTimeout):
        return UNCONFIRMED
    if isinstance(reply, StoreUnavailable):
        return REDIS_DOWN
    if isinstance(reply, BaseException):
        return REDIS_ERROR
    return WRITTEN


# ---------------------------------------------------------------------- from a thread of its own

_FAILURES = (RedisError, RedisClusterException, OSError)
_TOPOLOGY_REPLIES = (MovedError, AskError, ClusterDownError, TryAgainError)
REFRESH_INTERVAL_S = 0.25  # a cluster writer reads the topology again at most this often


def _nothing(*_: Any) -> None:
    return None


class StreamWriter:
    """`append_entries` for a thread: blocking, over a client of its own (see the module docstring).
    Use it from one thread at a time; `close()` when done."""

    def __init__(
        self,
        url: str,
        cfg: RedisConfig,
        *,
        down: Callable[[], bool] = lambda: False,
        failed: Callable[[str], None] = _nothing,
        succeeded: Callable[[], None] = _nothing,
    ) -> None:
        """`url`, `cfg`: the store's endpoint and options (`cfg.cluster`: a Redis Cluster). On a single
        Redis, `down()` says whether the store's breaker is open (then nothing is sent), `failed(why)`
        and `succeeded()` tell it what a batch found (called from this writer's thread)."""
        self.url = url
        self.cfg = cfg
        self._down, self._failed, self._succeeded = down, failed, succeeded
        self._client: redis.Redis | SyncRedisCluster | None = None
        self._stale = False  # cluster: the slot map moved, or a node failed: read it again
        self._refreshed_at = 0.0

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def append(self, entries: Sequence[tuple[str, bytes]], maxlen: int) -> list[str]:
        """XADD each `(stream key, record)`, trimming each stream to about `maxlen` entries. Never raises
        for Redis's sake: per entry, one of `OUTCOMES`."""
        if not entries:
            return []
        if self.cfg.cluster:
            return self._append_cluster(entries, maxlen)
        return self._append_single(entries, maxlen)

    # ------------------------------------------------------------------ a single Redis

    def _single(self) -> redis.Redis:
        if self._client is None:
            client = sync_client(self.url, self.cfg)
            assert isinstance(client, redis.Redis)
            # never retried (redis-py's default differs between versions): set before any connection
            client.connection_pool.connection_kwargs["retry"] = Retry(NoBackoff(), 0)
            self._client = client
        assert isinstance(self._client, redis.Redis)
        return self._client

    def _append_single(self, entries: Sequence[tuple[str, bytes]], maxlen: int) -> list[str]:
        if self._down():
            return [REDIS_DOWN] * len(entries)
        try:
            with self._single().pipeline(transaction=False) as pipe:
                for key, data in entries:
                    pipe.xadd(key, {FIELD: data}, maxlen=maxlen, approximate=True)
                replies = pipe.execute(raise_on_error=False)
        except RedisTimeoutError:
            # slow, not down: the breaker guards the history reads, and their own timeouts decide
            return [UNCONFIRMED] * len(entries)
        except (RedisConnectionError, ConnectionError, OSError) as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            return [REDIS_DOWN] * len(entries)
        except RedisError:
            return [REDIS_ERROR] * len(entries)
        self._succeeded()
        return [_outcome(r) for r in replies]

    # ------------------------------------------------------------------ a Redis Cluster

    def _cluster(self) -> SyncRedisCluster:
        """The cluster client, built (its topology read) on first use, and read again when stale."""
        now = time.monotonic()
        if self._client is None:
            self._refreshed_at = now
            client = sync_client(self.url, self.cfg)  # reads the topology: raises when none answers
            assert isinstance(client, SyncRedisCluster)
            self._client, self._stale = client, False
        elif self._stale and now - self._refreshed_at >= REFRESH_INTERVAL_S:
            self._refreshed_at = now
            assert isinstance(self._client, SyncRedisCluster)
            try:
                self._client.nodes_manager.initialize()
                self._stale = False
            except _FAILURES as exc:  # the old map is still the best there is
                log.warning("impression log: the cluster's topology could not be read: %s", exc)
        assert isinstance(self._client, SyncRedisCluster)
        return self._client

    def _append_cluster(self, entries: Sequence[tuple[str, bytes]], maxlen: int) -> list[str]:
        try:
            client = self._cluster()
        except _FAILURES as exc:
            log.warning("impression log: the cluster cannot be reached: %s", exc)
            return [REDIS_DOWN] * len(entries)
        out: list[str] = [REDIS_DOWN] * len(entries)  # a key no node serves stays down
        groups: dict[str, list[int]] = {}
        manager = client.nodes_manager
        for i, (key, _) in enumerate(entries):
            nodes = manager.slots_cache.get(key_slot(key.encode()))
            if nodes:
                groups.setdefault(nodes[0].name, []).append(i)
            else:
                self._stale = True
        for name, positions in groups.items():
            node = manager.nodes_cache.get(name)
            if node is None or node.redis_connection is None:
                self._stale = True
                continue
            commands = [
                ("XADD", entries[i][0], "MAXLEN", "~", maxlen, "*", FIELD, entries[i][1]) for i in positions
            ]
            replies = self._send_on(node.redis_connection, commands)
            for i, reply in zip(positions, replies, strict=True):
                if isinstance(reply, (StoreUnavailable, StoreTimeout, *_TOPOLOGY_REPLIES)):
                    self._stale = True
                out[i] = _outcome(reply)
        return out

    @staticmethod
    def _send_on(node: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One pipeline on one node: per command its reply or the exception it met (never retried)."""
        pool = node.connection_pool
        try:
            conn = pool.get_connection()  # connects (a failure: nothing was sent)
        except _FAILURES as exc:
            return [StoreUnavailable(f"redis cluster: {exc}")] * len(commands)
        try:
            replies: list[Any] = [None] * len(commands)
            k = 0
            try:
                conn.send_packed_command(conn.pack_commands(commands))
                while k < len(commands):
                    try:
                        replies[k] = conn.read_response()
                    except (ResponseError, BusyLoadingError) as exc:  # that command did not run
                        replies[k] = exc
                    k += 1
            except _FAILURES as exc:  # sent, perhaps: not confirmed
                with contextlib.suppress(Exception):
                    conn.disconnect()
                for j in range(k, len(commands)):
                    replies[j] = StoreTimeout(f"redis cluster: {type(exc).__name__}: {exc}")
            return replies
        finally:
            pool.release(conn)
