"""Users' behaviour histories in Redis: `{prefix}hist:{user_id}`, a list of item ids, newest first.

Reads for a batch of users are one pipelined round trip; appends are one MULTI/EXEC. Every Redis
failure surfaces as `StoreUnavailable`, which the app maps to a degraded ranking or a 503.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

T = TypeVar("T")


class StoreUnavailable(Exception):
    """Redis did not answer (connection refused, timeout) or answered with an error."""


def make_client(
    url: str,
    *,
    connect_timeout: float,
    timeout: float,
    max_connections: int,
    health_check_interval: float = 30.0,
) -> aioredis.Redis:
    """One async client over one connection pool, for `redis://`, `rediss://` and `unix://` URLs.

    Nothing connects here; the first command does. Close it with `await client.aclose()`.
    """
    pool = aioredis.ConnectionPool.from_url(
        url,
        socket_connect_timeout=connect_timeout,
        socket_timeout=timeout,
        max_connections=max_connections,
        health_check_interval=health_check_interval,
        decode_responses=True,
    )
    # auto_close_connection_pool: the client owns the pool, so aclose() closes both.
    return aioredis.Redis.from_pool(pool)


class HistoryStore:
    """Reads and appends users' histories (item ids, newest first, at most `max_history`)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "din:", max_history: int = 100) -> None:
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        self.client = client
        self.prefix = prefix
        self.max_history = max_history

    def key(self, user_id: str) -> str:
        return f"{self.prefix}hist:{user_id}"

    async def get_histories(self, user_ids: list[str]) -> list[list[str]]:
        """Each user's history, newest first, in the order asked; an unknown user gets []."""
        if not user_ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for user_id in user_ids:
                pipe.lrange(self.key(user_id), 0, self.max_history - 1)
            results = await _guard(pipe.execute)
        return [[_text(item) for item in items] for items in results]

    async def append_events(self, events: list[tuple[str, str]]) -> int:
        """Append (user_id, item_id) pairs given oldest first; all or nothing. Returns events written."""
        if not events:
            return 0
        per_user: dict[str, list[str]] = {}
        for user_id, item_id in events:
            per_user.setdefault(user_id, []).append(item_id)
        async with self.client.pipeline(transaction=True) as pipe:
            for user_id, items in per_user.items():
                key = self.key(user_id)
                # LPUSH a b c leaves c b a: the newest event ends up first.
                pipe.lpush(key, *items)
                pipe.ltrim(key, 0, self.max_history - 1)
            await _guard(pipe.execute)
        return len(events)

    async def ping(self) -> bool:
        """True when Redis answers; False (never an exception) when it does not."""
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False


async def _guard(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc


def _text(value: str | bytes) -> str:
    # decode_responses=True gives str; tolerate a client built without it.
    return value.decode() if isinstance(value, bytes) else value
