"""Users' behaviour histories in Redis (key layout: `service.store.keys`), newest first.

Reads for a batch of users are one pipelined round trip, answered per user: a key Redis cannot read
as a list (WRONGTYPE) fails that user alone (`get_histories` returns a `StoreUnavailable` in its
place), while a Redis that does not answer fails the whole call. T (how much of a history is read or
kept) comes from the model that will use it, per call, so a model swap changes it in one place.

Appends are one Lua script (`_APPEND`, EVALSHA with an EVAL fallback): Redis runs it atomically,
and it checks everything that could fail before its first write, so a call is written entirely or
not at all. Events may carry an id; an id written within `dedup_ttl_s` is skipped, which makes a
retry safe. What a failed append tells the caller:

- `StoreUnavailable`: nothing was written (no connection, or Redis refused the script, or a history
  key holds something other than a list);
- `StoreTimeout`: the script was sent but no answer came back (timeout, connection lost): the events
  may or may not have been written; a retry with the same event ids writes each of them once.

The messages of both name Redis internals (keys, errors): they are for the log, not for clients.

A Redis that stops answering (no connection, no reply in time, still loading its data) opens a
breaker (`service.store.breaker`): until a background PING answers again, reads, appends and pings
fail at once with `StoreUnavailable` (nothing was sent, so nothing was written), instead of every call
waiting out the connect timeout of a Redis that is gone.

Redis Cluster (the client is redis-py's `RedisCluster`): the same keys and the same script, run by
`service.store.cluster`: reads grouped by node, one script call per user (atomic per user, not across
users), with `StorePartial` when some users were written and others not. No breaker there: a node's
failure is that node's (its users degrade, the others do not) and the topology refresh follows it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import BusyLoadingError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contracts.errors import StorePartial, StoreTimeout, StoreUnavailable
from service.store.breaker import RedisBreaker
from service.store.cluster import ClusterHistories
from service.store.keys import DEFAULT_PREFIX, cluster_event_key, event_key, history_key
from service.store.streams import WRITTEN, append_entries

DEFAULT_DEDUP_TTL_S = 86400

# One event for `append_events`: (user_id, item_id), (user_id, item_id, event_id or None), or
# (user_id, item_id, event_id or None, feedback or None), where feedback is (stream key, record bytes):
# an entry for the impression log's feedback stream, written only when the event is.
Feedback = tuple[str, bytes]
EventIn = tuple[str, str] | tuple[str, str, str | None] | tuple[str, str, str | None, Feedback | None]

# KEYS: the U history keys, then the K event-id keys, then the S feedback stream keys.
# ARGV: T, dedup ttl (s), U, K, stream maxlen, then per event, oldest first: user index (1..U), item id,
# event-id index (1..K, 0: no id), stream index (1..S, 0: no feedback), feedback record ("" if none).
# Returns {written, duplicates, {ordinals (1..) of the events written}}, or {-1, {user indices whose key
# is not a list}} / {-2, {stream indices whose key is not a stream}} having written nothing.
# Why nothing is half written: a script is not rolled back, but every check comes before the first
# write, and after the type checks no write here can fail (XADD on a stream or nothing, LPUSH/LTRIM on a
# list or nothing, SET on any key; Redis refuses writes for OOM only before a script's first write).
# An event skipped as a duplicate records no feedback either: a retry never records a click twice.
_APPEND = """
local T, ttl, U, K = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local maxlen = ARGV[5]
local bad = {}
for u = 1, U do
  local t = redis.call('TYPE', KEYS[u])['ok']
  if t ~= 'list' and t ~= 'none' then bad[#bad + 1] = u end
end
if #bad > 0 then return {-1, bad} end
for s = U + K + 1, #KEYS do
  local t = redis.call('TYPE', KEYS[s])['ok']
  if t ~= 'stream' and t ~= 'none' then bad[#bad + 1] = s - U - K end
end
if #bad > 0 then return {-2, bad} end
local seen, push, written, dups, fresh, e = {}, {}, 0, 0, {}, 0
for a = 6, #ARGV, 5 do
  e = e + 1
  local u, item, k, s = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local new = true
  if k > 0 then
    if seen[k] or redis.call('EXISTS', KEYS[U + k]) == 1 then new = false else seen[k] = true end
  end
  if new then
    push[u] = push[u] or {}
    table.insert(push[u], item)
    written = written + 1
    fresh[#fresh + 1] = e
    if s > 0 then
      redis.call('XADD', KEYS[U + K + s], 'MAXLEN', '~', maxlen, '*', 'record', ARGV[a + 4])
    end
  else
    dups = dups + 1
  end
end
for k in pairs(seen) do redis.call('SET', KEYS[U + k], '1', 'NX', 'EX', ttl) end
for u, items in pairs(push) do
  for i = 1, #items, 1000 do
    redis.call('LPUSH', KEYS[u], unpack(items, i, math.min(i + 999, #items)))
  end
  redis.call('LTRIM', KEYS[u], 0, T - 1)
end
return {written, dups, fresh}
"""
_APPEND_SHA = hashlib.sha1(_APPEND.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Appended:
    written: int  # events pushed onto histories
    duplicates: int  # events skipped: their id was already written (earlier, or earlier in this call)
    feedback: int = 0  # feedback records written (with their events)
    # events (positions in the call) whose feedback was not recorded though the event was written:
    # Redis Cluster only, where the feedback stream is on another node than the history
    feedback_lost: tuple[int, ...] = ()


class HistoryStore:
    """Reads and appends users' histories (item ids, newest first)."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        prefix: str = DEFAULT_PREFIX,
        *,
        read_from_replicas: bool = False,
    ) -> None:
        """`client`: from `service.store.client.async_client`; a cluster client switches to the cluster
        paths (`read_from_replicas`: history reads go to the replicas)."""
        self.client = client
        self.prefix = prefix
        self.cluster: ClusterHistories | None = None
        self.breaker: RedisBreaker | None = None  # a single Redis: fail fast while it does not answer
        if isinstance(client, RedisCluster):
            self.cluster = ClusterHistories(client, read_from_replicas=read_from_replicas)
        else:
            self._append = client.register_script(_APPEND)
            self.breaker = RedisBreaker(self._ping)

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
        if self.cluster is not None:
            got = await self.cluster.read([self.key(u) for u in user_ids], max_history)
            return [h if isinstance(h, StoreUnavailable) else [_text(i) for i in h] for h in got]
        assert isinstance(self.client, aioredis.Redis) and self.breaker is not None
        if self.breaker.open:
            raise StoreUnavailable(self.breaker.why())
        # A read may be sent again: a pooled connection that died with a restarted Redis fails the
        # first command sent on it, so a dropped connection gets one immediate retry (a fresh one).
        for attempt in (1, 2):
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for user_id in user_ids:
                        pipe.lrange(self.key(user_id), 0, max_history - 1)
                    results = await pipe.execute(raise_on_error=False)
                break
            except (RedisConnectionError, ConnectionError) as exc:
                if attempt == 2:
                    raise self._unanswered(exc) from exc
            except (RedisError, OSError) as exc:
                raise self._unanswered(exc) if _not_answering(exc) else _unavailable(exc) from exc
        self.breaker.succeeded()
        out: list[list[str] | StoreUnavailable] = []
        for user_id, res in zip(user_ids, results, strict=True):
            if isinstance(res, ResponseError) and str(res).startswith("WRONGTYPE"):
                out.append(StoreUnavailable(f"redis: {self.key(user_id)}: {res}"))
            elif isinstance(res, Exception):  # an error that is not about this key: Redis itself
                raise StoreUnavailable(f"redis: {type(res).__name__}: {res}") from res
            else:
                out.append([_text(item) for item in res])
        return out

    async def append_events(
        self,
        events: Sequence[EventIn],
        max_history: int,
        *,
        dedup_ttl_s: int = DEFAULT_DEDUP_TTL_S,
        feedback_maxlen: int = 1,
    ) -> Appended:
        """Append events given oldest first, keeping each list to `max_history`; all or nothing.
        An event whose id was written within `dedup_ttl_s` seconds, or earlier in `events`, is skipped.
        An event's feedback entry is added to its stream (trimmed to about `feedback_maxlen`) when the
        event is written: in the same script on a single Redis, right after it on a Redis Cluster.
        Raises `StoreUnavailable` (nothing was written) or `StoreTimeout` (outcome unknown)."""
        _check(max_history)
        if dedup_ttl_s < 1:
            raise ValueError(f"dedup_ttl_s must be >= 1, got {dedup_ttl_s}")
        if not events:
            return Appended(0, 0)
        if self.cluster is not None:
            return await self._append_cluster(events, max_history, dedup_ttl_s, feedback_maxlen)
        assert self.breaker is not None
        if self.breaker.open:
            raise StoreUnavailable(f"nothing was written: {self.breaker.why()}")
        users: dict[str, int] = {}
        ids: dict[str, int] = {}
        streams: dict[str, int] = {}
        args: list[str | int | bytes] = [max_history, dedup_ttl_s, 0, 0, feedback_maxlen]
        n_feedback = 0
        for user_id, item_id, event_id, fb in map(_event, events):
            u = users.setdefault(user_id, len(users) + 1)
            k = 0 if event_id is None else ids.setdefault(event_id, len(ids) + 1)
            s = 0 if fb is None else streams.setdefault(fb[0], len(streams) + 1)
            args += [u, item_id, k, s, b"" if fb is None else fb[1]]
            n_feedback += fb is not None
        args[2], args[3] = len(users), len(ids)
        keys = [self.key(u) for u in users] + [event_key(self.prefix, e) for e in ids] + list(streams)
        reply = await self._run_append(keys, args)
        first, second = reply[0], reply[1]
        if first == -1:
            names = list(users)
            bad = ", ".join(self.key(names[int(i) - 1]) for i in second)
            raise StoreUnavailable(f"redis: not a list, nothing was written: {bad}")
        if first == -2:
            names = list(streams)
            bad = ", ".join(names[int(i) - 1] for i in second)
            raise StoreUnavailable(f"redis: not a stream, nothing was written: {bad}")
        written = {int(e) - 1 for e in reply[2]} if len(reply) > 2 else set()
        feedback = sum(1 for i in written if _event(events[i])[3] is not None) if n_feedback else 0
        return Appended(int(first), int(second), feedback)

    async def _append_cluster(
        self, events: Sequence[EventIn], max_history: int, dedup_ttl_s: int, feedback_maxlen: int
    ) -> Appended:
        """Redis Cluster: one `_APPEND` call per user (its history, then its event markers: one slot)."""
        assert self.cluster is not None
        calls: dict[str, tuple[list[str], list[str | int | bytes]]] = {}
        ids: dict[str, dict[str, int]] = {}  # per user: event id -> its index among that user's keys
        positions: dict[str, list[int]] = {}  # per user: the positions in `events` of its events
        for i, (user_id, item_id, event_id, _) in enumerate(map(_event, events)):
            if user_id not in calls:
                calls[user_id] = ([self.key(user_id)], [max_history, dedup_ttl_s, 1, 0, feedback_maxlen])
                ids[user_id] = {}
                positions[user_id] = []
            keys, args = calls[user_id]
            k = 0
            if event_id is not None:
                if event_id not in ids[user_id]:
                    ids[user_id][event_id] = len(ids[user_id]) + 1
                    keys.append(cluster_event_key(self.prefix, user_id, event_id))
                k = ids[user_id][event_id]
            args += [1, item_id, k, 0, b""]
            positions[user_id].append(i)
        for keys, args in calls.values():
            args[3] = len(keys) - 1
        done = await self.cluster.append(calls, _APPEND, _APPEND_SHA)
        # the feedback of the events written (the script said which), on the nodes of its streams
        fresh = [positions[user][int(e) - 1] for user, ordinals in done.fresh.items() for e in ordinals]
        with_feedback = [i for i in sorted(fresh) if _event(events[i])[3] is not None]
        lost: tuple[int, ...] = ()
        if with_feedback:
            entries = [_event(events[i])[3] for i in with_feedback]
            outcomes = await append_entries(self, [e for e in entries if e is not None], feedback_maxlen)
            lost = tuple(i for i, o in zip(with_feedback, outcomes, strict=True) if o != WRITTEN)
        feedback = len(with_feedback) - len(lost)
        if not done.failed_users and not done.unknown_users:
            return Appended(done.written, done.duplicates, feedback, lost)
        detail = "; ".join(done.errors)
        if done.written_users:
            raise StorePartial(
                "redis cluster stored the events of some users and not of others: each user's events are "
                "written entirely or not at all; `written_users` are stored, `not_written_users` are not, "
                "`unknown_users` may or may not be; retrying with the same event_ids is safe",
                detail=detail,
                written=done.written,
                duplicates=done.duplicates,
                written_users=done.written_users,
                not_written_users=done.failed_users,
                unknown_users=done.unknown_users,
            )
        if done.unknown_users:
            raise StoreTimeout(f"redis cluster: no answer to the append: {detail}")
        raise StoreUnavailable(f"redis cluster: nothing was written: {detail}")

    async def _run_append(self, keys: list[str], args: list[str | int | bytes]) -> list[Any]:
        # A connection of our own, connected before the script is sent: a failure to get one means
        # nothing was sent, a failure after sending leaves the outcome unknown.
        assert isinstance(self.client, aioredis.Redis) and self.breaker is not None
        conn = self.client.client()
        try:
            try:
                await conn.initialize()
            except (RedisError, OSError) as exc:
                raise self._unanswered(exc) if _not_answering(exc) else _unavailable(exc) from exc
            try:
                result: list[Any] = await self._append(keys=keys, args=args, client=conn)
            except BusyLoadingError as exc:  # an error reply (the script wrote nothing), and Redis is loading
                raise self._unanswered(exc) from exc
            except ResponseError as exc:  # an error reply: the script wrote nothing
                raise _unavailable(exc) from exc
            except (RedisError, OSError) as exc:
                self.breaker.failed(f"{type(exc).__name__}: {exc}")
                raise StoreTimeout(f"redis: no answer to the append: {type(exc).__name__}: {exc}") from exc
            self.breaker.succeeded()
            return result
        finally:
            await conn.aclose()

    async def ping(self) -> bool:
        """True when Redis answers (a cluster: one of its masters); False (never an exception) when not.
        With the breaker open: False at once (its own probe is asking); a failed ping opens it."""
        if self.cluster is not None:
            return await self.cluster.ping()
        assert self.breaker is not None
        if self.breaker.open:
            return False
        ok = await self._ping()
        if ok:
            self.breaker.succeeded()
        else:
            self.breaker.failed("no answer to PING")
        return ok

    async def _ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    def _unanswered(self, exc: BaseException) -> StoreUnavailable:
        """Redis did not answer (no connection, no reply in time, loading): the breaker opens."""
        assert self.breaker is not None
        self.breaker.failed(f"{type(exc).__name__}: {exc}")
        return _unavailable(exc)

    async def aclose(self) -> None:
        """Stop background work (a cluster's topology refresh, the breaker's probe); the client is
        closed by its owner."""
        if self.cluster is not None:
            await self.cluster.aclose()
        if self.breaker is not None:
            await self.breaker.aclose()


def _event(event: EventIn) -> tuple[str, str, str | None, Feedback | None]:
    """(user_id, item_id, event_id or None, feedback or None) of any form of `EventIn`."""
    if len(event) == 4:
        return event
    return event[0], event[1], event[2] if len(event) == 3 else None, None


def _not_answering(exc: BaseException) -> bool:
    """A failure that says Redis is not answering (rather than answering with an error)."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError))


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"redis: {type(exc).__name__}: {exc}")


def _check(max_history: int) -> None:
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")


def _text(value: str | bytes) -> str:
    # decode_responses=True gives str; tolerate a client built without it.
    return value.decode() if isinstance(value, bytes) else value
