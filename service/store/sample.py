"""A few users that have a history: the ranking explorer's suggestions (read-only, bounded in time).

SCAN over the history keys (a cluster client scans every master), stopped at `limit` users or at
`timeout_s`, whichever comes first: a large keyspace is never walked whole for a suggestion."""

from __future__ import annotations

import asyncio
import contextlib
import re

from service.store.cluster import FAILURES
from service.store.history import HistoryStore

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


async def sample_users(store: HistoryStore, limit: int, timeout_s: float = 0.5) -> list[str]:
    """Up to `limit` user ids with a history key, in SCAN order; [] when Redis cannot be read."""
    head = store.key("")  # the history key of the empty user id: the part every key starts with
    pattern = _GLOB_SPECIAL.sub(r"\\\1", head) + "*"
    users: list[str] = []
    with contextlib.suppress(TimeoutError, *FAILURES):
        async with asyncio.timeout(timeout_s):
            async for key in store.client.scan_iter(match=pattern, count=200):
                text = key.decode() if isinstance(key, bytes) else str(key)
                if text.startswith(head) and len(text) > len(head):
                    users.append(text[len(head) :])
                    if len(users) >= limit:
                        break
    return sorted(set(users))
