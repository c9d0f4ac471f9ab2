"""The Redis key layout, written once: every reader and writer builds its keys here.

`{prefix}hist:{user_id}`: a list of item ids, newest first, at most T long (prefix default `din:`).
`{prefix}routing`: the routing of model versions (A/B arms, shadows), one JSON document (`service.routing`).
`{prefix}evt:{event_id}`: a marker ("1") that event `event_id` was written to a history, set in the
same atomic script as the write and expiring after `events_dedup_ttl_s` (default a day): a retry of
that event within the window is skipped instead of written twice.

Redis Cluster keeps the history keys as they are (one key per user, spread over the slots by their
whole name). A script may only touch keys of one slot, so there the event markers live beside the
history they belong to: `{prefix}evt:{<tag>}:{event_id}`, where the hash tag `<tag>` puts the marker in
the slot of `user_id`'s history (`cluster_event_key`). An event id is then remembered per user.

The impression log (`service.impressions`) is Redis Streams: `{prefix}log:imp` (what /rank answered)
and `{prefix}log:fb` (feedback from /events naming an impression). Spread over `n > 1` streams (Redis
Cluster: DIN_LOG_STREAMS), stream k is `{prefix}log:imp:{<tag k>}` and `{prefix}log:fb:{<tag k>}`: both
in one slot, chosen evenly over the slot space (`log_slot`), so a cluster whose slots are split evenly
among its masters (as `redis-cli --cluster create` splits them) gives each master its share of the
streams. A record goes to stream `log_shard(impression_id, n)`, its feedback to the same one.
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


def impressions_key(prefix: str, shard: int = 0, shards: int = 1) -> str:
    """Stream `shard` (of `shards`) of the impression log."""
    return f"{prefix}log:imp" if shards == 1 else f"{prefix}log:imp:{{{_log_tag(shard, shards)}}}"


def feedback_key(prefix: str, shard: int = 0, shards: int = 1) -> str:
    """Stream `shard` (of `shards`) of the feedback log: in the slot of impression stream `shard`."""
    return f"{prefix}log:fb" if shards == 1 else f"{prefix}log:fb:{{{_log_tag(shard, shards)}}}"


def routing_key(prefix: str) -> str:
    """The routing of model versions (`contracts.routing.Document` as JSON): one key, so one slot."""
    return f"{prefix}routing"


DEFAULT_CLUSTER_LOG_STREAMS = 8  # a Redis Cluster's log streams when none are configured


def log_streams(configured: int, cluster: bool) -> int:
    """How many streams the log is spread over: `configured` (DIN_LOG_STREAMS), or by default 1 on a
    single Redis and DEFAULT_CLUSTER_LOG_STREAMS on a cluster (the writer and every reader agree)."""
    return configured or (DEFAULT_CLUSTER_LOG_STREAMS if cluster else 1)


def log_shard(impression_id: str, shards: int) -> int:
    """The stream (0..shards-1) of impression `impression_id` and of its feedback: from the id's last
    32 random bits (a malformed id still gets one, from its hash)."""
    if shards == 1:
        return 0
    try:
        return int(impression_id[-8:], 16) % shards
    except ValueError:
        return key_slot(impression_id.encode()) % shards


def log_slot(shard: int, shards: int) -> int:
    """The hash slot of log stream `shard`: the middle of its share of the 16384 slots."""
    return (2 * shard + 1) * 16384 // (2 * shards)


def _log_tag(shard: int, shards: int) -> str:
    if not 0 <= shard < shards:
        raise ValueError(f"log stream {shard} of {shards}")
    return _slot_tag(log_slot(shard, shards))


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
