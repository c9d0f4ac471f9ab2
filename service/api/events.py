"""POST /events: append behaviours to users' histories, all or nothing, idempotent by event_id; an event
naming an `impression_id` is also recorded as feedback on the impression log (with DIN_LOG_IMPRESSIONS).

Feedback is written with its event: on a single Redis in the same atomic script (the event and its
feedback are both written or neither is, and a duplicate event records no feedback), so a failure is
the event's failure (503, nothing written). On a Redis Cluster the feedback stream is on another node
than the history, so it is written right after the events: feedback that could not be is named in the
answer (`feedback_not_recorded`) and counted (`din_feedback_lost_total`), the events stay written."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter
from fastapi.responses import Response

from contracts.errors import StoreDown, StorePartial, StoreTimeout, StoreUnavailable
from contracts.records import Feedback
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
    "atomic per user, see `store_partial`). An event naming an `impression_id` is also recorded as "
    "feedback for that impression when the impression log is on (in the same script; with Redis Cluster "
    "right after, `feedback_not_recorded` naming what could not be). An event whose "
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
    impressions = state.impressions
    now = time.time()
    batch = []
    for i in order:
        ev = evs[i]
        fb = None
        if (
            ev.impression_id is not None
            and impressions is not None
            and impressions.wants_feedback(ev.impression_id)
        ):
            record = Feedback(ev.impression_id, now, ev.user_id, ev.item_id, ev.event_id, ev.ts)
            fb = impressions.feedback_entry(record)
        batch.append((ev.user_id, ev.item_id, ev.event_id, fb))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        done = await store.append_events(
            batch,
            live.current.max_history,
            dedup_ttl_s=state.settings.events_dedup_ttl_s,
            feedback_maxlen=impressions.maxlen if impressions is not None else 1,
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
    metrics.feedback_logged.inc(done.feedback)
    answer: dict[str, object] = {"written": done.written, "duplicates": done.duplicates}
    if impressions is not None:  # with the log off the answer is as it always was
        answer["feedback"] = done.feedback
    if done.feedback_lost:
        metrics.feedback_lost.inc(len(done.feedback_lost))
        lost = [evs[order[k]].impression_id for k in done.feedback_lost]
        log.warning("/events: feedback of %d written events not recorded", len(lost))
        answer["feedback_not_recorded"] = lost
    return JSONResponse(answer)
