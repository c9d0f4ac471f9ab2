"""Histories in a Redis Cluster: reads grouped by node, appends atomic per user (`HistoryStore` uses
this when its client is redis-py's `RedisCluster`).

The key layout does not change (one key per user, `service.store.keys`), so a batch's keys spread
over the cluster's nodes. redis-py's cluster client keeps the topology (which node serves which slot,
and its replicas); this module uses it and adds what a service with deadlines needs:

- **Reads**: the batch's keys are grouped by the node that serves them, one pipeline per node, all
  nodes at once. A node that cannot be read fails its own users only (returned per user, the others
  keep their histories); a key whose slot moved (MOVED) is read again on its new owner through the
  cluster client. With `read_from_replicas` a shard's reads go to its replicas (round robin) and fall
  back to its master when the replica refuses the connection.
- **Appends**: one `_APPEND` script call per user (its history and its event markers share a slot,
  `cluster_event_key`), the calls of one node pipelined on one connection, all nodes at once. Every
  history is first checked to be a list (one TYPE pipeline per node): a key that is not refuses the
  whole call with nothing written, as on a single Redis. After that, each user's call is written
  entirely or not at all, and the outcome is known per user: `ClusterAppend` says who was written, who
  was not, and whose outcome is unknown (the node stopped answering after the call was sent).
- **Failover**: any error that says the topology changed (a node refusing connections, MOVED,
  CLUSTERDOWN, an uncovered slot) triggers one background refresh of the slot map (CLUSTER SLOTS, at
  most one every `REFRESH_INTERVAL_S`); nothing on a request's path waits for it. While a master is
  down its users' reads degrade; once its replica is promoted, the next refresh finds it and reads
  are personalised again, with no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.cluster import LoadBalancingStrategy
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from contracts.errors import StoreTimeout, StoreUnavailable

# What a cluster call raises when nodes fail. redis-py's RedisClusterException family ("cannot be
# connected", no node for a slot) is not a RedisError: catching RedisError alone let it out as a 500.
FAILURES = (RedisError, RedisClusterException, OSError)

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 0.25  # at most one topology refresh this often, while errors keep coming

# Error replies that mean the slot map is stale or the cluster is re-arranging itself.
_TOPOLOGY_REPLIES = (MovedError, AskError, ClusterDownError, TryAgainError)


@dataclass
class ClusterAppend:
    """What one call's per-user scripts did. `written` / `duplicates` count the users that were written."""

    written: int = 0
    duplicates: int = 0
    written_users: list[str] = field(default_factory=list)  # every event of these users is stored
    failed_users: list[str] = field(default_factory=list)  # nothing of these users was written
    unknown_users: list[str] = field(default_factory=list)  # sent, not confirmed: may or may not be
    errors: list[str] = field(default_factory=list)  # for the log (names nodes and Redis errors)
    fresh: dict[str, list[int]] = field(default_factory=dict)  # per user written: its events written (1..)


class ClusterHistories:
    """The cluster side of `HistoryStore` (see the module docstring)."""

    def __init__(self, client: RedisCluster, *, read_from_replicas: bool = False) -> None:
        self.client = client
        self.read_from_replicas = read_from_replicas
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = 0.0

    # ------------------------------------------------------------------ topology

    async def _ready(self) -> None:
        """The first call discovers the cluster (redis-py's own initialisation)."""
        try:
            await self.client.initialize()
        except FAILURES as exc:
            raise StoreUnavailable(f"redis cluster: {type(exc).__name__}: {exc}") from exc

    def refresh_soon(self) -> None:
        """Re-read the slot map in the background (one at a time, at most every REFRESH_INTERVAL_S)."""
        if self._refreshing is not None and not self._refreshing.done():
            return
        if time.monotonic() - self._last_refresh < REFRESH_INTERVAL_S:
            return
        self._last_refresh = time.monotonic()
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            await self.client.nodes_manager.initialize()
        except FAILURES as exc:  # the next error tries again
            log.warning("redis cluster: topology refresh failed: %s: %s", type(exc).__name__, exc)

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refreshing

    def _primary(self, key: str) -> ClusterNode | None:
        nodes = self.client.nodes_manager.slots_cache.get(key_slot(key.encode()))
        return nodes[0] if nodes else None

    def _groups(self, keys: Sequence[str], *, reads: bool) -> tuple[dict[str, list[int]], list[int]]:
        """Key positions by the name of the node to ask (and the positions of uncovered keys). Reads
        with `read_from_replicas` pick one replica per shard for the whole batch (round robin)."""
        groups: dict[str, list[int]] = {}
        uncovered: list[int] = []
        chosen: dict[str, ClusterNode] = {}  # shard (its master's name) -> the node asked this time
        manager = self.client.nodes_manager
        for i, key in enumerate(keys):
            slot = key_slot(key.encode())
            nodes = manager.slots_cache.get(slot)
            if not nodes:
                uncovered.append(i)
                continue
            node = nodes[0]
            if reads and self.read_from_replicas and len(nodes) > 1:
                if node.name not in chosen:
                    strategy = LoadBalancingStrategy.ROUND_ROBIN_REPLICAS
                    chosen[node.name] = manager.get_node_from_slot(slot, load_balancing_strategy=strategy)
                node = chosen[node.name]
            groups.setdefault(node.name, []).append(i)
        return groups, uncovered

    # ------------------------------------------------------------------ reads

    async def read(self, keys: Sequence[str], max_history: int) -> list[list[str] | StoreUnavailable]:
        """Each key's newest `max_history` items; a key that cannot be read gets a `StoreUnavailable`.
        Raises `StoreUnavailable` when the cluster cannot be reached at all (nothing was read)."""
        return await self._per_node(keys, ("LRANGE", 0, max_history - 1), reads=True)

    async def types(self, keys: Sequence[str]) -> list[str | StoreUnavailable]:
        """The TYPE of each key, asked of its master."""
        return await self._per_node(keys, ("TYPE",), reads=False)

    async def _per_node(self, keys: Sequence[str], command: tuple[Any, ...], *, reads: bool) -> list[Any]:
        await self._ready()
        out: list[Any] = [None] * len(keys)
        groups, uncovered = self._groups(keys, reads=reads)
        for i in uncovered:
            out[i] = StoreUnavailable(f"redis cluster: no node serves the slot of {keys[i]}")
        nodes = self.client.nodes_manager.nodes_cache
        names = list(groups)
        done = await asyncio.gather(
            *(self._pipeline(nodes[name], [keys[i] for i in groups[name]], command) for name in names),
            return_exceptions=True,
        )
        topology_changed = bool(uncovered)
        answered = False  # some node answered something
        for name, result in zip(names, done, strict=True):
            positions = groups[name]
            if isinstance(result, BaseException):
                if not isinstance(result, FAILURES):
                    raise result
                log.warning("redis cluster: node %s: %s: %s", name, type(result).__name__, result)
                topology_changed = True
                result = await self._fallback(name, [keys[i] for i in positions], command, reads=reads)
            for i, res in zip(positions, result, strict=True):
                answered = answered or not isinstance(res, StoreUnavailable)
                if isinstance(res, (MovedError, AskError)):  # the slot moved: the client follows it
                    with contextlib.suppress(*FAILURES):
                        res = await self.client.execute_command(command[0], keys[i], *command[1:])
                if isinstance(res, _TOPOLOGY_REPLIES):
                    topology_changed = True
                if isinstance(res, BaseException) and not isinstance(res, StoreUnavailable):
                    res = StoreUnavailable(f"redis cluster: {keys[i]}: {type(res).__name__}: {res}")
                out[i] = res
        if topology_changed:
            self.refresh_soon()
        if keys and not answered:
            raise StoreUnavailable(f"redis cluster: no node answered: {out[0].message}")
        return out

    async def _fallback(
        self, failed: str, keys: list[str], command: tuple[Any, ...], *, reads: bool
    ) -> list[Any]:
        """A replica that could not be read: its shard's master instead (once). Else the error, per key."""
        master = self._primary(keys[0]) if reads and self.read_from_replicas else None
        if master is not None and master.name != failed:
            try:
                return await self._pipeline(master, keys, command)
            except FAILURES as exc:
                error = f"{type(exc).__name__}: {exc}"
        else:
            error = f"node {failed} could not be read"
        return [StoreUnavailable(f"redis cluster: {error}") for _ in keys]

    @staticmethod
    async def _pipeline(node: ClusterNode, keys: list[str], command: tuple[Any, ...]) -> list[Any]:
        """One pipeline on one node: per key its reply, or the error reply as an exception. Raises when
        the node itself fails (connection refused or lost, timeout)."""
        cmds = [PipelineCommand(i, command[0], key, *command[1:]) for i, key in enumerate(keys)]
        await node.execute_pipeline(cmds)
        return [cmd.result for cmd in cmds]

    # ------------------------------------------------------------------ appends

    async def append(
        self, calls: dict[str, tuple[list[str], list[str | int | bytes]]], script: str, sha: str
    ) -> ClusterAppend:
        """Run `script` once per user: `calls[user] = (keys, args)`, every key in that user's slot,
        the history key first. Per node, one connection carries that node's calls in one pipeline;
        nodes run at once. Raises `StoreUnavailable` (nothing was written) when a history is not a
        list or cannot be checked."""
        await self._ready()
        users = list(calls)
        history_keys = [calls[u][0][0] for u in users]
        # Everything that can refuse the whole call is checked before anything is written.
        kinds = await self.types(history_keys)
        unchecked = [k for k in kinds if isinstance(k, StoreUnavailable)]
        if unchecked:
            raise StoreUnavailable(f"redis cluster: nothing was written: {unchecked[0].message}")
        bad = [key for key, kind in zip(history_keys, kinds, strict=True) if kind not in ("list", "none")]
        if bad:
            raise StoreUnavailable(f"redis: not a list, nothing was written: {', '.join(bad)}")
        outcome = ClusterAppend()
        positions, uncovered = self._groups(history_keys, reads=False)  # by master
        for i in uncovered:
            outcome.failed_users.append(users[i])
            outcome.errors.append(f"no node serves the slot of {history_keys[i]}")
        groups = {name: [users[i] for i in at] for name, at in positions.items()}
        nodes = self.client.nodes_manager.nodes_cache
        results = await asyncio.gather(
            *(self._append_on(nodes[n], [calls[u] for u in us], script, sha) for n, us in groups.items())
        )
        topology_changed = bool(outcome.failed_users)
        for (name, group), per_user in zip(groups.items(), results, strict=True):
            for user, res in zip(group, per_user, strict=True):
                if isinstance(res, list) and res and int(res[0]) != -1:
                    outcome.written_users.append(user)
                    outcome.written += int(res[0])
                    outcome.duplicates += int(res[1])
                    outcome.fresh[user] = [int(e) for e in res[2]] if len(res) > 2 else []
                    continue
                if isinstance(res, _Unknown):
                    outcome.unknown_users.append(user)
                else:  # an error reply, a refused connection, or the script's own refusal
                    outcome.failed_users.append(user)
                why = res.error if isinstance(res, _Unknown) else f"{type(res).__name__}: {res}"
                outcome.errors.append(f"{name}: {user}: {why}")
                is_reply = isinstance(res, ResponseError) and not isinstance(res, _TOPOLOGY_REPLIES)
                topology_changed = topology_changed or not (is_reply or isinstance(res, list))
        if topology_changed:
            self.refresh_soon()
        return outcome

    @staticmethod
    async def _append_on(
        node: ClusterNode, calls: list[tuple[list[str], list[str | int | bytes]]], script: str, sha: str
    ) -> list[Any]:
        """The scripts of one node, pipelined on one connection. Per call: the script's reply, or why
        nothing was written (an error reply: the script did not run; the connection could not be
        made: nothing was sent), or `_Unknown` (sent, not answered)."""
        conn = node.acquire_connection()
        replies: list[Any] = [None] * len(calls)
        pending: list[int] = []  # sent, not answered yet
        try:
            try:
                await conn.connect()
            except FAILURES as exc:
                return [exc] * len(calls)
            try:
                pending = list(range(len(calls)))
                await conn.send_packed_command(
                    conn.pack_commands(("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls)
                )
                await _read_replies(conn, pending, replies)
                again = [k for k, r in enumerate(replies) if isinstance(r, NoScriptError)]
                if again:  # the node has not seen the script yet: the same calls, by its text
                    pending = list(again)
                    await conn.send_packed_command(
                        conn.pack_commands(
                            ("EVAL", script, len(calls[k][0]), *calls[k][0], *calls[k][1]) for k in again
                        )
                    )
                    await _read_replies(conn, pending, replies)
            except FAILURES as exc:
                with contextlib.suppress(Exception):
                    await conn.disconnect()
                for k in pending:
                    replies[k] = _Unknown(f"{type(exc).__name__}: {exc}")
            return replies
        finally:
            node.release(conn)

    # ------------------------------------------------------------------ any command, by node

    async def send(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Each command (its key second: `("XADD", key, ...)`) on the master of its key's slot: one
        pipeline per node, nodes at once, never retried. Per command its reply, or the exception it
        met: a node's error reply, `StoreUnavailable` when its node could not be asked (no node serves
        the slot, or the connection failed before anything was sent), `StoreTimeout` when it was sent
        and no answer came back (it may or may not have run). Raises `StoreUnavailable` when the
        cluster cannot be reached at all."""
        await self._ready()
        out: list[Any] = [None] * len(commands)
        groups, uncovered = self._groups([c[1] for c in commands], reads=False)
        for i in uncovered:
            out[i] = StoreUnavailable(f"redis cluster: no node serves the slot of {commands[i][1]}")
        nodes = self.client.nodes_manager.nodes_cache
        names = list(groups)
        done = await asyncio.gather(
            *(self._send_on(nodes[name], [commands[i] for i in groups[name]]) for name in names)
        )
        topology_changed = bool(uncovered)
        for name, results in zip(names, done, strict=True):
            for i, res in zip(groups[name], results, strict=True):
                if isinstance(res, (StoreUnavailable, StoreTimeout, *_TOPOLOGY_REPLIES)):
                    topology_changed = True
                out[i] = res
        if topology_changed:
            self.refresh_soon()
        return out

    @staticmethod
    async def _send_on(node: ClusterNode, commands: list[tuple[Any, ...]]) -> list[Any]:
        conn = node.acquire_connection()
        try:
            try:
                await conn.connect()
            except FAILURES as exc:
                return [StoreUnavailable(f"redis cluster: node {node.name}: {exc}")] * len(commands)
            replies: list[Any] = [None] * len(commands)
            pending = list(range(len(commands)))
            try:
                await conn.send_packed_command(conn.pack_commands(commands))
                await _read_replies(conn, pending, replies)
            except FAILURES as exc:
                with contextlib.suppress(Exception):
                    await conn.disconnect()
                for k in pending:
                    replies[k] = StoreTimeout(f"redis cluster: node {node.name}: {type(exc).__name__}: {exc}")
            return replies
        finally:
            node.release(conn)

    # ------------------------------------------------------------------ health

    async def ping(self) -> bool:
        """True when the cluster can be reached and one of its masters answers PING."""
        try:
            await self._ready()
            primaries = self.client.get_primaries()
            answers = await asyncio.gather(
                *(node.execute_command("PING") for node in primaries), return_exceptions=True
            )
        except (*FAILURES, StoreUnavailable):
            return False
        if any(isinstance(a, BaseException) for a in answers):
            self.refresh_soon()
        return any(a is True or a == "PONG" for a in answers)


@dataclass(frozen=True)
class _Unknown:
    error: str


async def _read_replies(conn: Any, pending: list[int], replies: list[Any]) -> None:
    """Read the replies of `pending` calls in order into `replies`, taking each off `pending` once
    known (an error reply is known too: that script did not run)."""
    while pending:
        k = pending[0]
        try:
            replies[k] = await conn.read_response()
        except (ResponseError, BusyLoadingError) as exc:
            replies[k] = exc
        pending.pop(0)
