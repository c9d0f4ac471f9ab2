"""The routing of several live model versions: A/B arms, shadows, and who sees which arm.

A `Routing` names arms (a name, a bundle and its model version, a share of the traffic) and shadow
versions (scored on a sample of requests, never shown), under a salt. It lives in Redis as one JSON
document (`service.routing`), so every replica routes every user alike; `revision` counts its changes.

Assignment. A user's arm is read off a table of BUCKETS buckets: bucket = blake2b(salt, user id)
mod BUCKETS, and each arm owns a set of buckets (ranges) in proportion to its weight. A new routing is
allocated from the one it replaces (`allocate`): an arm keeps the buckets it had, up to its new share;
an arm that shrinks gives up its highest buckets, and an arm that grows takes the lowest free ones. So
a weight change moves only the users it must, from the arms that shrank to the arms that grew (10% ->
20% for one arm moves 10% of users, all into that arm; the other arms keep every user they still have
room for), whatever the number of arms; the plain "cumulative ranges in arm order" layout would move
users between arms whose weights did not change. A new salt starts a new experiment: every bucket is
reallocated. Weighted rendezvous hashing was the other stateless candidate; it keeps shares but, with
three arms, a change of two arms' weights moves users in and out of the third.

Plain data, no Redis, no HTTP, no torch: the service, the CLI and the tests read it alike.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from contracts.errors import RoutingError

BUCKETS = 10_000  # a share is a multiple of 0.01%
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HISTORY = 10  # earlier routings kept in the document, for rollback
NO_ROUTING = "(none)"  # how a report and the explorer name traffic served without a routing


@dataclass(frozen=True, slots=True)
class Arm:
    name: str
    model_version: str
    bundle: str  # the bundle's directory, as every replica sees it
    weight: float  # share of the users, relative to the other arms' weights
    buckets: tuple[tuple[int, int], ...] = ()  # [start, end) ranges of the bucket table it owns


@dataclass(frozen=True, slots=True)
class Shadow:
    model_version: str
    bundle: str
    sample_rate: float  # of the requests (decided by the impression id), 0..1


@dataclass(frozen=True, slots=True)
class Routing:
    revision: int
    salt: str
    arms: tuple[Arm, ...]
    shadows: tuple[Shadow, ...] = ()
    updated_at: float = 0.0  # unix seconds
    note: str = ""  # what made it (put, promote, rollback), for /admin/models and the log
    _table: np.ndarray | None = field(default=None, compare=False, repr=False)

    # ---------------------------------------------------------------- assignment

    def arm_of(self, user_id: str) -> Arm:
        """The arm `user_id` is in (deterministic: salt, user id and the bucket table)."""
        table = self._table if self._table is not None else self.table()
        return self.arms[int(table[bucket(self.salt, user_id)])]

    def table(self) -> np.ndarray:
        """bucket -> index of its arm (int16, BUCKETS long); every bucket is owned."""
        table = np.full(BUCKETS, -1, dtype=np.int16)
        for i, arm in enumerate(self.arms):
            for start, end in arm.buckets:
                table[start:end] = i
        if (table < 0).any():
            raise RoutingError("the arms' buckets do not cover the table", "arms")
        return table

    def compiled(self) -> Routing:
        """This routing with its bucket table built once (what a replica keeps in force)."""
        return replace(self, _table=self.table())

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)

    def versions(self) -> dict[str, str]:
        """Every model version it needs live -> its bundle (arms first, then shadows)."""
        out: dict[str, str] = {}
        for a in self.arms:
            out.setdefault(a.model_version, a.bundle)
        for s in self.shadows:
            out.setdefault(s.model_version, s.bundle)
        return out

    # ---------------------------------------------------------------- the document

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "salt": self.salt,
            "arms": [
                {
                    "name": a.name,
                    "model_version": a.model_version,
                    "bundle": a.bundle,
                    "weight": a.weight,
                    "buckets": [list(r) for r in a.buckets],
                }
                for a in self.arms
            ],
            "shadows": [
                {"model_version": s.model_version, "bundle": s.bundle, "sample_rate": s.sample_rate}
                for s in self.shadows
            ],
            "updated_at": self.updated_at,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Routing:
        """The inverse of `to_dict`, checked (RoutingError naming the field)."""
        try:
            arms = tuple(
                Arm(
                    str(a["name"]),
                    str(a["model_version"]),
                    str(a["bundle"]),
                    float(a["weight"]),
                    tuple((int(s), int(e)) for s, e in a.get("buckets", [])),
                )
                for a in data["arms"]
            )
            shadows = tuple(
                Shadow(str(s["model_version"]), str(s["bundle"]), float(s["sample_rate"]))
                for s in data.get("shadows", [])
            )
            routing = cls(
                int(data["revision"]),
                str(data["salt"]),
                arms,
                shadows,
                float(data.get("updated_at", 0.0)),
                str(data.get("note", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RoutingError(f"not a routing document: {type(e).__name__}: {e}") from None
        check(routing.arms, routing.shadows, routing.salt)
        routing.table()  # every bucket owned
        return routing


def bucket(salt: str, user_id: str) -> int:
    """The user's bucket, 0..BUCKETS-1: the same on every replica and in every process."""
    digest = hashlib.blake2b(f"{salt}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def check(arms: Sequence[Arm], shadows: Sequence[Shadow], salt: str) -> None:
    """Raise RoutingError (naming the field) unless the arms and shadows can be in force."""
    if not isinstance(salt, str) or not salt or len(salt) > 128:
        raise RoutingError("salt must be a non-empty string of at most 128 characters", "salt")
    if not arms:
        raise RoutingError("a routing needs at least one arm", "arms")
    seen: set[str] = set()
    for i, a in enumerate(arms):
        if not ARM_NAME.match(a.name):
            raise RoutingError(
                f"arm name {a.name!r}: 1-64 letters, digits, '_', '.' or '-', starting with a letter or "
                "digit",
                f"arms[{i}].name",
            )
        if a.name in seen:
            raise RoutingError(f"arm name {a.name!r} is used twice", f"arms[{i}].name")
        seen.add(a.name)
        if not (math.isfinite(a.weight) and a.weight >= 0):
            raise RoutingError(f"weight must be a finite number >= 0 (got {a.weight})", f"arms[{i}].weight")
        if not a.model_version:
            raise RoutingError("model_version is empty", f"arms[{i}].model_version")
    if not sum(a.weight for a in arms) > 0:
        raise RoutingError("at least one arm needs a weight > 0", "arms")
    arm_versions = {a.model_version for a in arms}
    shadow_versions: set[str] = set()
    for i, s in enumerate(shadows):
        if not (math.isfinite(s.sample_rate) and 0 <= s.sample_rate <= 1):
            raise RoutingError(
                f"sample_rate must be between 0 and 1 (got {s.sample_rate})", f"shadows[{i}].sample_rate"
            )
        if s.model_version in arm_versions:
            raise RoutingError(
                f"{s.model_version} is served by an arm: a shadow scores a version nobody is shown",
                f"shadows[{i}].model_version",
            )
        if s.model_version in shadow_versions:
            raise RoutingError(f"{s.model_version} is a shadow twice", f"shadows[{i}].model_version")
        shadow_versions.add(s.model_version)


def shares(weights: Sequence[float]) -> list[int]:
    """Buckets per arm: weights scaled to BUCKETS, rounded by largest remainder (they sum to BUCKETS)."""
    total = sum(weights)
    exact = [w / total * BUCKETS for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: BUCKETS - sum(counts)]:
        counts[i] += 1
    return counts


def allocate(arms: Sequence[Arm], previous: Routing | None, salt: str) -> tuple[Arm, ...]:
    """`arms` with their buckets, moving as few users as their new weights allow from `previous` (an
    arm keeps the buckets it had under the same name, up to its new share; see the module docstring).
    A different salt (or no previous routing) lays the arms out afresh, in order."""
    counts = shares([a.weight for a in arms])
    owner = np.full(BUCKETS, -1, dtype=np.int32)
    if previous is not None and previous.salt == salt:
        index = {a.name: i for i, a in enumerate(arms)}
        for old in previous.arms:
            if (i := index.get(old.name)) is not None:
                for start, end in old.buckets:
                    owner[start:end] = i
        for i, want in enumerate(counts):  # shrink: give up the highest buckets beyond the new share
            mine = np.flatnonzero(owner == i)
            if len(mine) > want:
                owner[mine[want:]] = -1
    free = iter(np.flatnonzero(owner < 0).tolist())
    for i, want in enumerate(counts):  # grow: take the lowest free buckets
        have = int((owner == i).sum())
        for _ in range(want - have):
            owner[next(free)] = i
    return tuple(replace(a, buckets=_ranges(np.flatnonzero(owner == i))) for i, a in enumerate(arms))


def _ranges(indices: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Sorted bucket indices -> [start, end) ranges."""
    if len(indices) == 0:
        return ()
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate(([indices[0]], indices[breaks]))
    ends = np.concatenate((indices[breaks - 1] + 1, [indices[-1] + 1]))
    return tuple((int(s), int(e)) for s, e in zip(starts, ends, strict=True))


def build(
    arms: Sequence[Arm],
    shadows: Sequence[Shadow],
    salt: str,
    previous: Routing | None,
    note: str = "",
    now: float | None = None,
) -> Routing:
    """The routing that follows `previous` (revision + 1), its arms allocated from it. Checked."""
    check(arms, shadows, salt)
    revision = (previous.revision if previous is not None else 0) + 1
    stamp = time.time() if now is None else now
    return Routing(revision, salt, allocate(arms, previous, salt), tuple(shadows), stamp, note)


def promoted(current: Routing, arm_name: str) -> Routing:
    """`current` with arm `arm_name` serving everyone (the other arms dropped, shadows kept)."""
    arm = current.arm(arm_name)
    if arm is None:
        names = ", ".join(a.name for a in current.arms)
        raise RoutingError(f"no arm {arm_name!r} in routing {current.revision} (arms: {names})", "arm")
    return build([replace(arm, weight=1.0)], current.shadows, current.salt, current, f"promote {arm_name}")


@dataclass(frozen=True, slots=True)
class Document:
    """What Redis holds: the routing in force (None: none, every user gets the replica's own bundle)
    and the earlier ones, newest first (rollback goes back one). `revision` counts every change,
    clearing included."""

    revision: int
    current: Routing | None
    history: tuple[Routing | None, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "current": None if self.current is None else self.current.to_dict(),
            "history": [None if r is None else r.to_dict() for r in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Document:
        def one(r: dict[str, Any] | None) -> Routing | None:
            return None if r is None else Routing.from_dict(r)

        try:
            return cls(int(data["revision"]), one(data["current"]), tuple(one(r) for r in data["history"]))
        except (KeyError, TypeError, ValueError) as e:
            raise RoutingError(f"not a routing document: {type(e).__name__}: {e}") from None

    def then(self, routing: Routing | None) -> Document:
        """The document after `routing` comes in force (the one it replaces goes into the history)."""
        if routing is not None and routing.revision != self.revision + 1:
            routing = replace(routing, revision=self.revision + 1)
        history = (self.current, *self.history)[:HISTORY] if self.revision else ()
        return Document(self.revision + 1, routing, history)

    def rolled_back(self) -> Document:
        """The document with the routing before the current one back in force (as a new revision)."""
        if not self.history:
            raise RoutingError("nothing to roll back to: no earlier routing", "routing")
        back, rest = self.history[0], self.history[1:]
        revision = self.revision + 1
        restored = (
            None
            if back is None
            else replace(back, revision=revision, note="rollback", updated_at=time.time())
        )
        return Document(revision, restored, rest)
