"""POST /events: append behaviours to users' histories, all or nothing, idempotent by event_id."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import Response

from contracts.errors import StoreDown, StorePartial, StoreTimeout, StoreUnavailable
from service.api.deps import LiveDep, MetricsDep, StateDep, StoreDep
from service.schemas import ERROR_RESPONSES, EventsRequest, EventsResponse, JSONResponse

log = logging.getLogger(__name__)

# What clients are told. The store's own messages name keys and Redis errors: those go to the log.
NOT_WRITTEN = "redis could not store the events; nothing was written"
OUTCOME_UNKNOWN = (
    "redis did not confirm the write in time: the events may or may not have been written; "
    "retrying with the same event_ids is safe (an event without an event_id may be written twice)"
)

_RESPONSES = {
    **ERROR_RESPONSES,
    503: {
        **ERROR_RESPONSES[503],
        "description": "`store_unavailable`: nothing was written (Redis down, or a history it cannot "
        "append to); `store_timeout`: the write was sent but not confirmed, so its outcome is unknown "
        "and a retry with the same event_ids is safe; `store_partial` (Redis Cluster only, where a call "
        "is atomic per user): `written_users` were written, `not_written_users` were not, "
        "`unknown_users` may or may not have been; a retry with the same event_ids is safe",
    },
}


router = APIRouter(tags=["ranking"])


@router.post(
    "/events",
    response_model=EventsResponse,
    responses=_RESPONSES,
    summary="Append behaviours to users' histories",
    description="One atomic Redis script: every event is written or none is (with Redis Cluster: "
    "atomic per user, see `store_partial`). An event whose "
    "`event_id` was already written (within DIN_EVENTS_DEDUP_TTL_S), or appears earlier in the "
    "call, is skipped and counted in `duplicates`, so retries are safe. A 503 `store_unavailable` "
    "means nothing was written; a 503 `store_timeout` means the outcome is unknown: retry with "
    "the same event_ids.",
)
async def events(
    req: EventsRequest,
    state: StateDep,
    store: StoreDep,
    live: LiveDep,
    metrics: MetricsDep,
) -> Response:
    evs = req.events
    # Oldest first for the store; stable, and an event without ts counts as the newest.
    order = sorted(range(len(evs)), key=lambda i: (evs[i].ts is None, evs[i].ts or 0.0))
    batch = [(evs[i].user_id, evs[i].item_id, evs[i].event_id) for i in order]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        done = await store.append_events(
            batch, live.current.max_history, dedup_ttl_s=state.settings.events_dedup_ttl_s
        )
    except StorePartial as e:  # its message and lists are for the client; the detail for the log
        metrics.events_failures.labels(reason=e.code).inc()
        log.warning("/events partly written (%d events): %s", len(batch), e.detail)
        raise
    except StoreTimeout as e:
        metrics.events_failures.labels(reason=e.code).inc()
        log.warning("/events outcome unknown (%d events): %s", len(batch), e.message)
        raise StoreTimeout(OUTCOME_UNKNOWN) from e
    except StoreUnavailable as e:
        metrics.events_failures.labels(reason=StoreDown.code).inc()
        log.warning("/events refused, nothing written (%d events): %s", len(batch), e.message)
        raise StoreDown(NOT_WRITTEN) from e
    finally:
        metrics.redis_latency.labels(op="append_events").observe(loop.time() - t0)
    metrics.events_written.inc(done.written)
    metrics.events_duplicates.inc(done.duplicates)
    return JSONResponse({"written": done.written, "duplicates": done.duplicates})
