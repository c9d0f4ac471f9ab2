"""Appends to Redis Streams, the impression log's sink: pipelined, trimmed, never retried.

`append_entries(store, entries, maxlen)` sends `XADD key MAXLEN ~ maxlen * record <bytes>` for each
entry (approximate trimming: Redis drops whole macro nodes, so a stream holds `maxlen` entries and at
most one node more, and memory stays bounded). On a single Redis the entries are one pipeline, through
the store's breaker: while it is open nothing is sent, and a Redis that stops answering opens it (the
history reads then fail fast too). On a Redis Cluster each node gets its own pipeline
(`ClusterHistories.send`): a node that fails loses its own entries only.

Per entry the outcome is one of `OUTCOMES`; nothing is ever sent twice (a log that retried forever
would grow without bound behind a Redis that is down, and a retried XADD may duplicate a record).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contracts.errors import StoreTimeout, StoreUnavailable

if TYPE_CHECKING:  # the store imports this module
    from service.store.history import HistoryStore

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
