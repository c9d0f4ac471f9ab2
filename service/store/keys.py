"""The Redis key layout, written once: every reader and writer builds its keys here.

`{prefix}hist:{user_id}`: a list of item ids, newest first, at most T long (prefix default `din:`).
`{prefix}evt:{event_id}`: a marker ("1") that event `event_id` was written to a history, set in the
same atomic script as the write and expiring after `events_dedup_ttl_s` (default a day): a retry of
that event within the window is skipped instead of written twice.
"""

from __future__ import annotations

DEFAULT_PREFIX = "din:"


def history_key(prefix: str, user_id: str) -> str:
    """The key of `user_id`'s behaviour history."""
    return f"{prefix}hist:{user_id}"


def event_key(prefix: str, event_id: str) -> str:
    """The key that remembers event `event_id` was written (for idempotent retries)."""
    return f"{prefix}evt:{event_id}"
