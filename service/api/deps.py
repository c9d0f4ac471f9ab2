"""The app's state and the typed dependencies handlers use to reach it.

The lifespan (`service.app`) builds an `AppState` on `app.state.din`; handlers never read app.state
themselves, they declare what they need (`BatcherDep`, `StoreDep`, `LiveDep`, ...). The dependencies
are `async def`: FastAPI would run plain `def` ones in a worker thread, a hop per request for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from model.errors import NotReady
from service.batcher import Batcher
from service.config import Settings
from service.live import LiveModel
from service.metrics import Metrics
from service.store.history import HistoryStore


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    live: LiveModel = field(default_factory=LiveModel)  # the one holder of the served model
    store: HistoryStore | None = None
    batcher: Batcher | None = None
    ready: bool = False  # model loaded and warmed up
    not_ready_reason: str = "starting"

    def begin_shutdown(self) -> None:
        """From now on /readyz answers 503 shutting_down (requests are still served while draining)."""
        self.ready = False
        self.not_ready_reason = "shutting_down"
        self.metrics.ready.set(0)


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.din
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_live(state: StateDep) -> LiveModel:
    return state.live


async def get_metrics(state: StateDep) -> Metrics:
    return state.metrics


async def get_store(state: StateDep) -> HistoryStore:
    if state.store is None:
        raise NotReady("redis is not connected yet", reason="starting")
    return state.store


async def get_batcher(state: StateDep) -> Batcher:
    if state.batcher is None:
        raise NotReady("the model is not loaded yet", reason="starting")
    return state.batcher


LiveDep = Annotated[LiveModel, Depends(get_live)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
StoreDep = Annotated[HistoryStore, Depends(get_store)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
