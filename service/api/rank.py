"""POST /rank: score a user's candidates against their history and return them by CTR; with `explain`,
each returned item says which behaviours of the history raised its score most (`because`) and which
lowered it most (`against`), by each behaviour's exact leave-one-out contribution."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from contracts.errors import Overloaded
from contracts.records import IMPRESSION_ID_PATTERN
from service.api.deps import BatcherDep, StateDep
from service.explain import Reasons, reasons
from service.impressions import Answered, new_impression_id, sampled
from service.inference import RankResult
from service.log import request_deadline
from service.ranker import ranked
from service.schemas import (
    ARM_HEADER,
    ERROR_RESPONSES,
    IMPRESSION_HEADER,
    JSONResponse,
    RankRequest,
    RankResponse,
)
from service.shadow import ShadowJob

_UNEXPLAINED = (
    "nothing is explained: the user's history could not be read ({why}), so the scores rest on no "
    "behaviour at all"
)


def _explained(result: RankResult, n: int, top: int) -> tuple[list[tuple[Reasons, Reasons]], str | None]:
    """Per returned item its (`because`, `against`), and why nothing is explained (or None)."""
    if result.explanation is None:
        return [([], []) for _ in range(n)], _UNEXPLAINED.format(why=result.degraded or "no history")
    return reasons(result.explanation, top), None


router = APIRouter(tags=["ranking"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            IMPRESSION_HEADER: {
                "description": "the answer's `impression_id`",
                "schema": {"type": "string", "pattern": IMPRESSION_ID_PATTERN},
            },
            ARM_HEADER: {
                "description": "the arm that served it, when a routing of several versions is in force",
                "schema": {"type": "string"},
            },
        }
    },
    **ERROR_RESPONSES,
}


@router.post(
    "/rank",
    response_model=RankResponse,
    responses=_RESPONSES,
    summary="Rank candidates for a user",
    description="Scores every candidate against the user's history (from Redis, or `history`) and "
    "returns them by predicted CTR, descending. If Redis is down the answer is still 200, with an "
    "empty history and `degraded: true`. With `explain: true` each returned item gains `because` and "
    "`against`: the behaviours whose removal from the history would lower its score most (they raised "
    "it) and raise it most (they lowered it), each with its `contribution` = score with the history - "
    "score without that behaviour, exactly; at most `explain_top` each, for at most "
    "`DIN_MAX_EXPLAIN_ITEMS` returned items (set `top_k`). A degraded answer explains nothing "
    "(`explained: false`). Explained requests are shed first under load. A model exported before "
    "explanations existed answers `explain` with 422 cannot_explain. Every answer carries an "
    "`impression_id` (body and X-Impression-Id header); with DIN_LOG_IMPRESSIONS the answer is logged "
    "under it (off the request path: a full buffer or a Redis that is down drops the record, never the "
    "answer).",
)
async def rank(
    req: RankRequest,
    batcher: BatcherDep,
    state: StateDep,
    arm: Annotated[
        str | None,
        Header(
            alias=ARM_HEADER,
            description="serve this request from this arm of the routing in force, not the user's own "
            "(QA; behind the API keys like every /rank; logged as forced, left out of `din report`)",
            max_length=64,
        ),
    ] = None,
) -> Response:
    t0 = time.perf_counter()
    deadline = request_deadline(state.settings.request_budget_s)
    route = state.route(req.user_id, arm)
    # Duplicates are scored once; the first occurrence keeps its place (it only matters for ties).
    candidates = list(dict.fromkeys(req.candidates))
    if req.explain:
        returned = len(candidates) if req.top_k is None else min(req.top_k, len(candidates))
        most = state.settings.max_explain_items
        if returned > most:  # each explained item costs a head pass per behaviour: bounded
            raise RequestValidationError(
                [
                    {
                        "type": "less_than_equal",
                        "loc": ("body", "top_k"),
                        "msg": f"with explain, at most {most} items can be returned and explained "
                        f"(DIN_MAX_EXPLAIN_ITEMS); this request returns {returned}: set top_k <= {most}",
                        "input": req.top_k,
                    }
                ]
            )
        if not (ranker := route.member.current).can_explain:
            raise ranker.cannot_explain()  # at once; the batcher checks again (a reload may come between)
    try:  # nothing awaited between routing and queueing: a routing change never finds this lane gone
        result = await batcher.submit(
            req.user_id,
            candidates,
            req.history,
            deadline,
            explain=req.explain,
            top_k=req.top_k,
            model=route.member.name,
        )
    except Overloaded as e:
        version = route.member.current.model_version
        state.metrics.arm_shed.labels(
            arm=route.label, model_version=version, reason=e.extra.get("reason", "")
        ).inc()
        raise
    scores = result.scores
    order = result.explanation.order if result.explanation is not None else ranked(scores, req.top_k)
    values = scores[order].tolist()  # float32 -> python float
    items = [{"item_id": candidates[i], "score": v} for i, v in zip(order.tolist(), values, strict=True)]
    impression_id = new_impression_id()
    answer: dict[str, Any] = {
        "user_id": req.user_id,
        "model_version": result.model_version,
        "items": items,
        "history_length": result.history_length,
        "degraded": result.degraded is not None,
        "impression_id": impression_id,
    }
    if req.explain:
        lists, note = _explained(result, len(items), req.explain_top)
        for item, (because, against) in zip(items, lists, strict=True):
            item["because"] = because
            item["against"] = against
        answer["explained"] = note is None
        if note is not None:
            answer["explain_note"] = note
    answer["arm"] = route.arm
    answer["routing_revision"] = route.revision
    now = time.time()
    if state.impressions is not None:  # a side effect: buffered now, written by the log's own thread
        state.impressions.offer(
            Answered(
                impression_id,
                now,
                req.user_id,
                candidates,
                order,
                result,
                arm=route.arm,
                arm_forced=route.forced,
            )
        )
    if route.shadows and state.shadows is not None:  # scored later, on idle CPU (service.shadow)
        for member, shadow in route.shadows:
            if sampled(impression_id, shadow.sample_rate):
                state.shadows.offer(
                    ShadowJob(member, impression_id, now, req.user_id, candidates, result.history, order, t0)
                )
    state.count_answer(route, result, time.perf_counter() - t0)
    headers = {IMPRESSION_HEADER: impression_id}
    if route.arm is not None:
        headers[ARM_HEADER] = route.arm
    return JSONResponse(answer, headers=headers)
