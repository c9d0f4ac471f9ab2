"""The Redis key layout, written once: every reader and writer of histories builds its keys here.

`{prefix}hist:{user_id}`: a list of item ids, newest first, at most T long (prefix default `din:`).
"""

from __future__ import annotations

DEFAULT_PREFIX = "din:"


def history_key(prefix: str, user_id: str) -> str:
    """The key of `user_id`'s behaviour history."""
    return f"{prefix}hist:{user_id}"
