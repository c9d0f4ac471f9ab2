"""The Redis key layout, written once: every reader and writer builds its keys here.

`{prefix}hist:{user_id}`: a list of item ids, newest first, at most T long (prefix default `din:`).
`{prefix}evt:{event_id}`: a marker ("1") that event `event_id` was written to a history, set in the
same atomic script as the write and expiring after `events_dedup_ttl_s` (default a day): a retry of
that event within the window is skipped instead of written twice.

Redis Cluster keeps the history keys as they are (one key per user, spread over the slots by their
whole name). A script may only touch keys of one slot, so there the event markers live beside the
history they belong to: `{prefix}evt:{<tag>}:{event_id}`, where the hash tag `<tag>` puts the marker in
the slot of `user_id`'s history (`cluster_event_key`). An event id is then remembered per user.
"""

from __future__ import annotations

import functools
import itertools

from redis.crc import key_slot

DEFAULT_PREFIX = "din:"


def history_key(prefix: str, user_id: str) -> str:
    """The key of `user_id`'s behaviour history."""
    return f"{prefix}hist:{user_id}"


def event_key(prefix: str, event_id: str) -> str:
    """The key that remembers event `event_id` was written (for idempotent retries)."""
    return f"{prefix}evt:{event_id}"


def cluster_event_key(prefix: str, user_id: str, event_id: str) -> str:
    """Redis Cluster: the key that remembers event `event_id` was written to `user_id`'s history, in
    the same hash slot as that history (so one script can check it and append atomically).

    The hash tag is the part of the history key Redis hashes (the whole key, unless it holds a tag of
    its own); a part that cannot sit inside braces (it holds a `}`) is replaced by a short string of
    the same slot. The prefix must hold no braces (Settings refuses them in cluster mode)."""
    hashed = _hashed_part(history_key(prefix, user_id))
    tag = hashed if "}" not in hashed else _slot_tag(key_slot(hashed.encode()))
    return f"{prefix}evt:{{{tag}}}:{event_id}"


def _hashed_part(key: str) -> str:
    """What Redis Cluster hashes to place `key`: the first non-empty `{...}`, else the whole key."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


@functools.lru_cache(maxsize=1024)
def _slot_tag(slot: int) -> str:
    """A short brace-free string that hashes to `slot` (found by search: ~16k tries at most)."""
    for i in itertools.count():
        tag = f"s{i}"
        if key_slot(tag.encode()) == slot:
            return tag
    raise AssertionError("unreachable")
