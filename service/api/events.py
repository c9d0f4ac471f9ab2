"""POST /events: append behaviours to users' histories."""

# No `from __future__ import annotations` here: see service/api/rank.py.

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response

from model.errors import StoreDown, StoreUnavailable
from service.api.deps import LiveDep, MetricsDep, StoreDep
from service.schemas import ERROR_RESPONSES, EventsRequest, EventsResponse, JSONResponse, RequestModels


def router(models: RequestModels) -> APIRouter:
    EventsBody = models.events
    api = APIRouter(tags=["ranking"])

    @api.post(
        "/events",
        response_model=EventsResponse,
        responses=ERROR_RESPONSES,
        summary="Append behaviours to users' histories",
        description="One MULTI/EXEC: all events are written or none. Redis down: 503, nothing written.",
    )
    async def events(
        body: EventsBody,  # type: ignore[valid-type]
        store: StoreDep,
        live: LiveDep,
        metrics: MetricsDep,
    ) -> Response:
        req: EventsRequest = body  # mypy cannot read a per-app class as a type; this is its base
        evs = req.events
        # Oldest first for the store; stable, and an event without ts counts as the newest.
        order = sorted(range(len(evs)), key=lambda i: (evs[i].ts is None, evs[i].ts or 0.0))
        pairs = [(evs[i].user_id, evs[i].item_id) for i in order]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            written = await store.append_events(pairs, live.current.max_history)
        except StoreUnavailable as e:
            raise StoreDown(f"redis is unavailable, nothing was written: {e}") from e
        finally:
            metrics.redis_latency.labels(op="append_events").observe(loop.time() - t0)
        metrics.events_written.inc(written)
        return JSONResponse({"written": written})

    return api
