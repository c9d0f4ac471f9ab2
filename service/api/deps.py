"""The app's state and the typed dependencies handlers use to reach it.

The lifespan (`service.app`) builds an `AppState` on `app.state.din`; handlers never read app.state
themselves, they declare what they need (`BatcherDep`, `StoreDep`, `LiveDep`, ...). The dependencies
are `async def`: FastAPI would run plain `def` ones in a worker thread, a hop per request for nothing.

API keys: `api_key_guard(keys)` is the dependency list of every router that needs a key (with keys
configured, `Authorization: Bearer <key>` or 401 unauthorized). Routers do not ask for it themselves:
`service.api.api_router` includes every router under the guard by default, and only the probes
(/healthz, /readyz) and /metrics (unless DIN_METRICS_AUTH) are included outside it, by name. A new
router opts in by being included there like the others (nothing to declare); opting out is an explicit
line in `api_router`, next to the probes. Without keys the guard is empty: nothing is checked and the
OpenAPI schema shows no security scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request, Security, params
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from contracts.errors import NotReady, RoutingConflict, Unauthorized
from service.batcher import Batcher
from service.config import Settings
from service.impressions import ImpressionLog
from service.inference import RankResult
from service.live import ModelSet
from service.metrics import Metrics
from service.routing import Route, Router
from service.security import ApiKeys
from service.shadow import ShadowRunner
from service.store.history import HistoryStore


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    live: ModelSet = field(default_factory=ModelSet)  # the one holder of the served models
    store: HistoryStore | None = None
    batcher: Batcher | None = None
    impressions: ImpressionLog | None = None  # with DIN_LOG_IMPRESSIONS
    router: Router | None = None  # the routing of model versions in force (arms, shadows)
    shadows: ShadowRunner | None = None  # shadow scoring, on idle CPU
    ready: bool = False  # model loaded and warmed up
    not_ready_reason: str = "starting"

    def route(self, user_id: str, arm: str | None = None) -> Route:
        """Where `user_id`'s request goes (`Router.route`: RoutingError for an explicit `arm` that is
        not in force). The lifespan builds the router with the batcher: NotReady before either."""
        if self.router is None:
            raise NotReady("the routing is not read yet", reason="starting")
        return self.router.route(user_id, arm)

    def count_answer(self, route: Route, result: RankResult, seconds: float) -> None:
        """An answer in the per-arm metrics and the router's traffic (/admin/models)."""
        labels = {"arm": route.label, "model_version": result.model_version}
        self.metrics.arm_requests.labels(**labels).inc()
        self.metrics.arm_latency.labels(**labels).observe(seconds)
        if result.degraded is not None:
            self.metrics.arm_degraded.labels(**labels).inc()
        if self.router is not None:
            self.router.traffic[(route.label, result.model_version)] += 1

    def begin_shutdown(self) -> None:
        """From now on /readyz answers 503 shutting_down (requests are still served while draining)."""
        self.ready = False
        self.not_ready_reason = "shutting_down"
        self.metrics.ready.set(0)


def refuse_reload_under_routing(state: AppState) -> None:
    """A per-replica reload changes one replica's default version; while a routing is in force the
    fleet's versions change through it (RoutingConflict)."""
    if state.router is not None and (routing := state.router.routing) is not None:
        raise RoutingConflict(
            f"a routing of model versions is in force (revision {routing.revision}): change versions with "
            "PUT /admin/routing (or `din models`), promote or roll back; a reload would change this replica "
            "alone",
            revision=routing.revision,
        )


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.din
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_live(state: StateDep) -> ModelSet:
    return state.live


async def get_metrics(state: StateDep) -> Metrics:
    return state.metrics


async def get_store(state: StateDep) -> HistoryStore:
    if state.store is None:
        raise NotReady("redis is not connected yet", reason="starting")
    return state.store


async def get_router(state: StateDep) -> Router:
    if state.router is None:
        raise NotReady("the routing is not read yet", reason="starting")
    return state.router


async def get_batcher(state: StateDep) -> Batcher:
    if state.batcher is None:
        raise NotReady("the model is not loaded yet", reason="starting")
    return state.batcher


LiveDep = Annotated[ModelSet, Depends(get_live)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
StoreDep = Annotated[HistoryStore, Depends(get_store)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
RouterDep = Annotated[Router, Depends(get_router)]


# ------------------------------------------------------------------ API keys

_bearer = HTTPBearer(
    auto_error=False,  # a missing key is our 401 (JSON body, request id), not FastAPI's
    description="An API key from DIN_API_KEYS or DIN_API_KEYS_FILE: `Authorization: Bearer <key>`",
)
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def api_key_guard(keys: ApiKeys) -> list[params.Depends]:
    """The dependencies a router that needs an API key is included with (see this module's docstring):
    none when no key is configured."""
    if not keys:
        return []

    async def require_api_key(credentials: BearerCredentials) -> None:
        if credentials is None:  # no Authorization header, or not a Bearer one
            raise Unauthorized("an API key is required: send `Authorization: Bearer <key>`")
        if not keys.matches(credentials.credentials):
            raise Unauthorized("the API key is not valid")

    return [Security(require_api_key)]
