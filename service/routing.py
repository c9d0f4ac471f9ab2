"""Several model versions at once: the routing in force on this replica, and how it follows Redis.

The routing (`contracts.routing`: arms with weights, shadows with sample rates, a salt) is one JSON
document in Redis (`{prefix}routing`, `service.store.keys`), so every replica routes every user alike.
`Router.run` reads it every DIN_ROUTING_POLL_S; a new revision is put in force here once every version
it names is loaded, verified and warm (`service.live.load_member`, in a worker thread, beside the
versions serving meanwhile), by swapping one reference: a request routed before the swap is scored by
the version it was routed to. A routing this replica cannot put in force (a bundle it cannot load, a
bundle that holds another version than the routing names, more versions than DIN_MAX_MODELS) is
refused here: the old routing stays, and the reason is in /admin/models and din_routing_refused_total;
it is tried again only when the routing changes.

Changes (`change`: PUT /admin/routing, promote, rollback) are made by one replica: it loads what the
new routing needs first (so a routing it cannot serve is refused before any replica sees it), writes
the document with a compare-and-set on its revision (a Lua script: a concurrent change answers 409,
never a lost update), and puts it in force at once; the others follow within a poll.

Members. Each version is a member of the model set (`service.live.ModelSet`): its own ONNX Runtime
session and its own lane of the queue, so one graph call never mixes versions. The configured bundle
(DIN_BUNDLE) is the `default` member: it serves everyone while no routing is in force, and serves an
arm whose version is its own. Other versions are members named `@<version>`; one that no routing in
force names any more is unloaded once its lane is empty.

Without Redis the replica keeps the routing it has (a replica that starts during an outage serves its
configured bundle to everyone until it can read the routing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from redis.exceptions import RedisError

from contracts.bundle import load_bundle
from contracts.errors import BundleError, RoutingConflict, RoutingError, StoreDown
from contracts.routing import BUCKETS, NO_ROUTING, Document, Routing, Shadow
from service.config import Settings
from service.live import DEFAULT_MODEL, LiveModel, ModelSet, describe, load_member
from service.metrics import Metrics
from service.store.keys import routing_key

log = logging.getLogger(__name__)

# Compare-and-set of the routing document: written only if its revision is still ARGV[1]; answers -1
# when written, else the revision it found (0: no document).
_CAS = """
local cur = redis.call('GET', KEYS[1])
local rev = 0
if cur then rev = tonumber(cjson.decode(cur)['revision']) end
if rev ~= tonumber(ARGV[1]) then return rev end
redis.call('SET', KEYS[1], ARGV[2])
return -1
"""


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: its arm (None: no routing in force), the member that scores it, the
    routing's revision, whether the arm was asked for (QA header) rather than hashed, and the shadows
    that may score it too."""

    arm: str | None
    member: LiveModel
    revision: int | None
    forced: bool = False
    shadows: tuple[tuple[LiveModel, Shadow], ...] = ()

    @property
    def label(self) -> str:
        return self.arm if self.arm is not None else NO_ROUTING


@dataclass(frozen=True, slots=True)
class _InForce:
    routing: Routing  # compiled (its bucket table built)
    arms: dict[str, LiveModel]
    shadows: tuple[tuple[LiveModel, Shadow], ...]


class Router:
    def __init__(
        self,
        models: ModelSet,
        settings: Settings,
        metrics: Metrics,
        client: Any,
        *,
        busy: Callable[[str], bool] = lambda name: False,
    ) -> None:
        """`client`: the store's async Redis (or Redis Cluster) client. `busy(name)`: whether member
        `name` still has requests queued (it is unloaded only when not)."""
        self.models = models
        self.settings = settings
        self.metrics = metrics
        self.client = client
        self.key = routing_key(settings.redis_prefix)
        self.busy = busy
        self._in_force: _InForce | None = None
        self.revision = 0  # the document's revision this replica follows (0: none read yet)
        self.refused: dict[str, Any] | None = None  # the last routing refused here, and why
        self.traffic: Counter[tuple[str, str]] = Counter()  # (arm, version) -> answers routed here
        self._lock = asyncio.Lock()  # one load / change at a time
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- the request path

    @property
    def routing(self) -> Routing | None:
        """The routing in force here (None: every user gets the default member)."""
        return self._in_force.routing if self._in_force is not None else None

    def route(self, user_id: str, arm: str | None = None) -> Route:
        """The arm and member for `user_id`; `arm`: an explicit arm (QA), RoutingError if unknown."""
        now = self._in_force
        if now is None:
            if arm is not None:
                raise RoutingError(f"no routing is in force: there is no arm {arm!r}", "X-Din-Arm")
            return Route(None, self.models.default, None)
        if arm is not None:
            if arm not in now.arms:
                names = ", ".join(now.arms)
                raise RoutingError(f"no arm {arm!r} in the routing in force (arms: {names})", "X-Din-Arm")
            return Route(arm, now.arms[arm], now.routing.revision, True, now.shadows)
        name = now.routing.arm_of(user_id).name
        return Route(name, now.arms[name], now.routing.revision, False, now.shadows)

    # ---------------------------------------------------------------- following Redis

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="din-routing")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run(self) -> None:
        """Follow the document in Redis every DIN_ROUTING_POLL_S until cancelled."""
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the follower die: the next poll tries again
                log.exception("reading the routing failed")
            await asyncio.sleep(self.settings.routing_poll_s)

    async def read(self) -> Document | None:
        """The document in Redis (None: there is none). Raises StoreDown when Redis does not answer,
        RoutingError when what it holds is not a routing document."""
        try:
            raw = await self.client.get(self.key)
        except (RedisError, OSError) as e:
            raise StoreDown(f"the routing could not be read from redis: {e}") from None
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise RoutingError(f"{self.key} holds no JSON: {e}") from None
        return Document.from_dict(data)

    async def sync(self) -> None:
        """Put the document's routing in force if it is new here (and not refused already)."""
        try:
            doc = await self.read()
        except StoreDown:
            return  # Redis away: the routing in force stays
        except RoutingError as e:
            self._refuse(-1, e.message)
            return
        revision = doc.revision if doc is not None else 0
        if revision == self.revision or (self.refused is not None and self.refused["revision"] == revision):
            self._retire()
            return
        async with self._lock:
            # read again under the lock: a change made here meanwhile must not be undone by a stale read
            try:
                doc = await self.read()
            except (StoreDown, RoutingError):
                return
            revision = doc.revision if doc is not None else 0
            if revision == self.revision:
                return
            try:
                await self._apply(doc)
            except RoutingError as e:
                self._refuse(revision, e.message)

    def _refuse(self, revision: int, reason: str) -> None:
        if self.refused is None or self.refused["revision"] != revision:
            self.metrics.routing_refused.inc()
            log.error("routing %d refused here (the routing in force stays): %s", revision, reason)
        self.refused = {"revision": revision, "reason": reason, "at": time.time()}

    async def _apply(self, doc: Document | None) -> None:
        """Load what `doc`'s routing needs, then put it in force (one reference swapped)."""
        routing = doc.current if doc is not None else None
        in_force = await self._prepare(routing) if routing is not None else None
        self._in_force = in_force
        self.revision = doc.revision if doc is not None else 0
        self.refused = None
        self.metrics.routing_revision.set(routing.revision if routing is not None else 0)
        if routing is None:
            log.info("routing %d: none in force, the configured bundle serves everyone", self.revision)
        else:
            arms = ", ".join(f"{a.name}={a.model_version}@{a.weight:g}" for a in routing.arms)
            shadows = ", ".join(f"{s.model_version}@{s.sample_rate:g}" for s in routing.shadows)
            log.info("routing %d in force: arms %s; shadows %s", routing.revision, arms, shadows or "none")
        self._retire()

    async def _prepare(self, routing: Routing) -> _InForce:
        """The members `routing` needs, loading the missing ones. RoutingError names what failed."""
        needed = routing.versions()
        default = self.models.default
        default_version = default.current.model_version if default.loaded else None
        names = {v: (DEFAULT_MODEL if v == default_version else f"@{v}") for v in needed}
        live = {DEFAULT_MODEL, *names.values()}
        if len(live) > self.settings.max_models:
            raise RoutingError(
                f"this routing needs {len(live)} model versions live here (the configured bundle's and "
                f"{len(needed)} named), DIN_MAX_MODELS is {self.settings.max_models}",
                "arms",
            )
        arm_versions = {a.model_version for a in routing.arms}
        members: dict[str, LiveModel] = {}
        for version, bundle in needed.items():
            name = names[version]
            member = self.models.find(name)
            if member is None:
                member = await self._load(name, version, bundle, routing, version not in arm_versions)
            members[version] = member
        arms = {a.name: members[a.model_version] for a in routing.arms}
        shadows = tuple((members[s.model_version], s) for s in routing.shadows)
        return _InForce(routing.compiled(), arms, shadows)

    async def _load(self, name: str, version: str, bundle: str, routing: Routing, shadow: bool) -> LiveModel:
        field = _field_of(routing, version)
        try:
            member = await asyncio.to_thread(load_member, self.settings, name, Path(bundle), shadow=shadow)
        except BundleError as e:
            raise RoutingError(f"version {version} cannot be loaded here: {e.message}", field) from None
        except Exception as e:  # a warm-up that fails: the detail in the log
            log.exception("version %s (%s) failed its warm-up", version, bundle)
            raise RoutingError(f"version {version} ({bundle}) failed its warm-up: {e}", field) from None
        found = member.current.model_version
        if found != version:
            raise RoutingError(
                f"bundle {bundle} holds model version {found}, not {version} as the routing says", field
            )
        if self.models.find(name) is None:
            self.models.add(member)
        describe(self.metrics, member.current, name)
        if member.memory_bytes is not None:
            self.metrics.model_memory.labels(model_version=version).set(member.memory_bytes)
        return self.models.get(name)

    def _retire(self) -> None:
        """Unload the members no routing in force names (never the default one), once their lanes are
        empty: a batch already running holds its model and finishes on it."""
        used = {DEFAULT_MODEL}
        if self._in_force is not None:
            used |= {m.name for m in self._in_force.arms.values()}
            used |= {m.name for m, _ in self._in_force.shadows}
        for member in list(self.models):
            if member.name not in used and not self.busy(member.name):
                self.models.remove(member.name)
                version = member.current.model_version if member.loaded else member.name
                with contextlib.suppress(KeyError):
                    self.metrics.model_memory.remove(version)
                log.info("version %s unloaded: no routing in force names it", version)

    # ---------------------------------------------------------------- changes (admin)

    async def change(self, make: Callable[[Document], Document], expected: int | None = None) -> Document:
        """Write the document `make` turns the current one into, and put it in force here.

        Loads what the new routing needs first (RoutingError: refused, nothing written); writes only
        if the document is still at the revision it was read at, and at `expected` when given
        (RoutingConflict otherwise); StoreDown when Redis does not answer."""
        async with self._lock:
            try:
                doc = await self.read() or Document(0, None)
            except RoutingError:  # a document nobody can read is replaced
                doc = Document(0, None)
            if expected is not None and expected != doc.revision:
                raise RoutingConflict(
                    f"the routing is at revision {doc.revision}, not {expected}: read it again and retry",
                    revision=doc.revision,
                )
            new = make(doc)
            if new.current is not None:
                await self._prepare(new.current)  # refused here before any replica sees it
            try:
                found = await self.client.eval(_CAS, 1, self.key, doc.revision, orjson.dumps(new.to_dict()))
            except (RedisError, OSError) as e:
                raise StoreDown(f"the routing could not be written to redis: {e}") from None
            if int(found) != -1:
                raise RoutingConflict(
                    f"the routing changed meanwhile (now revision {found}); read it again and retry",
                    revision=int(found),
                )
            await self._apply(new)
            return new

    async def version_of(self, bundle: str | None, version: str | None, field: str) -> tuple[str, str]:
        """(model version, bundle) of a routing entry that gives either or both: a version alone must
        be live here (its bundle is known); a bundle alone is read for its version."""
        if bundle is None:
            if version is None:
                raise RoutingError("give the bundle, or the model_version of a version live here", field)
            for m in self.models:
                if m.loaded and m.current.model_version == version:
                    return version, str(m.current.bundle.path)
            live = ", ".join(m.current.model_version for m in self.models if m.loaded)
            raise RoutingError(
                f"version {version} is not live here (live: {live}): give its bundle",
                f"{field}.model_version",
            )
        for m in self.models:
            if m.loaded and str(m.current.bundle.path) == str(Path(bundle)):
                found = m.current.model_version
                break
        else:
            try:
                found = (await asyncio.to_thread(load_bundle, bundle)).model_version
            except BundleError as e:
                raise RoutingError(
                    f"bundle {bundle} cannot be loaded here: {e.message}", f"{field}.bundle"
                ) from None
        if version is not None and version != found:
            raise RoutingError(
                f"bundle {bundle} holds model version {found}, not {version}", f"{field}.model_version"
            )
        return found, bundle

    # ---------------------------------------------------------------- reporting

    def describe(self) -> dict[str, Any]:
        """What /admin/models shows: the routing in force, the last refusal, every live version."""
        now = self._in_force
        routing = now.routing.to_dict() if now is not None else None
        if routing is not None:
            for arm in routing["arms"]:
                arm["share"] = sum(e - s for s, e in arm.pop("buckets")) / BUCKETS
        arms_of: dict[str, list[str]] = {}
        shadow_of: dict[str, float] = {}
        if now is not None:
            for arm_name, member in now.arms.items():
                arms_of.setdefault(member.name, []).append(arm_name)
            for member, shadow in now.shadows:
                shadow_of[member.name] = shadow.sample_rate
        versions = []
        for m in self.models:
            if not m.loaded:
                continue
            r = m.current
            versions.append(
                {
                    "member": m.name,
                    "model_version": r.model_version,
                    "bundle": str(r.bundle.path),
                    "memory_bytes": m.memory_bytes,
                    "can_explain": r.can_explain,
                    "arms": arms_of.get(m.name, [] if now is not None else [NO_ROUTING]),
                    "shadow_sample_rate": shadow_of.get(m.name),
                }
            )
        return {
            "revision": self.revision,
            "routing": routing,
            "refused": self.refused,
            "versions": versions,
            "max_models": self.settings.max_models,
            "traffic": [
                {"arm": arm, "model_version": version, "answers": n}
                for (arm, version), n in sorted(self.traffic.items())
            ],
        }


def _field_of(routing: Routing, version: str) -> str:
    """The field of `routing` that names `version` (for an error's `detail`)."""
    for i, a in enumerate(routing.arms):
        if a.model_version == version:
            return f"arms[{i}].bundle"
    for i, s in enumerate(routing.shadows):
        if s.model_version == version:
            return f"shadows[{i}].bundle"
    return "routing"
