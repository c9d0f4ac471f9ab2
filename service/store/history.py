"""Users' behaviour histories in Redis (key layout: `service.store.keys`), newest first.

Reads for a batch of users are one pipelined round trip, answered per user: a key Redis cannot read
as a list (WRONGTYPE) fails that user alone (`get_histories` returns a `StoreUnavailable` in its
place), while a Redis that does not answer fails the whole call. Appends are one MULTI/EXEC. T (how
much of a history is read or kept) comes from the model that will use it, per call, so a model swap
changes it in one place. Every Redis failure surfaces as `StoreUnavailable`, which the service maps
to a degraded ranking (reads) or a 503 (writes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from model.errors import StoreUnavailable
from service.store.keys import DEFAULT_PREFIX, history_key

T = TypeVar("T")


class HistoryStore:
    """Reads and appends users' histories (item ids, newest first)."""

    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix

    def key(self, user_id: str) -> str:
        return history_key(self.prefix, user_id)

    async def get_histories(
        self, user_ids: list[str], max_history: int
    ) -> list[list[str] | StoreUnavailable]:
        """Each user's newest `max_history` items, in the order asked; an unknown user gets [], a user
        whose key cannot be read as a list gets a `StoreUnavailable` (returned, not raised). Raises
        `StoreUnavailable` when Redis does not answer (or refuses the whole pipeline)."""
        _check(max_history)
        if not user_ids:
            return []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for user_id in user_ids:
                    pipe.lrange(self.key(user_id), 0, max_history - 1)
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        out: list[list[str] | StoreUnavailable] = []
        for user_id, res in zip(user_ids, results, strict=True):
            if isinstance(res, ResponseError) and str(res).startswith("WRONGTYPE"):
                out.append(StoreUnavailable(f"redis: {self.key(user_id)}: {res}"))
            elif isinstance(res, Exception):  # an error that is not about this key: Redis itself
                raise StoreUnavailable(f"redis: {type(res).__name__}: {res}") from res
            else:
                out.append([_text(item) for item in res])
        return out

    async def append_events(self, events: list[tuple[str, str]], max_history: int) -> int:
        """Append (user_id, item_id) pairs given oldest first, keeping each list to `max_history`;
        all or nothing. Returns the number of events written."""
        _check(max_history)
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
                pipe.ltrim(key, 0, max_history - 1)
            await _guard(pipe.execute)
        return len(events)

    async def ping(self) -> bool:
        """True when Redis answers; False (never an exception) when it does not."""
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False


def _check(max_history: int) -> None:
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")


async def _guard(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc


def _text(value: str | bytes) -> str:
    # decode_responses=True gives str; tolerate a client built without it.
    return value.decode() if isinstance(value, bytes) else value
