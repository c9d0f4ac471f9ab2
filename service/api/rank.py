"""POST /rank: score a user's candidates against their history and return them by CTR."""

# No `from __future__ import annotations` here: FastAPI reads the handler's annotations when the
# route is declared, and the body model is a local of `router()` (this app's, with its limits).

import time

import numpy as np
from fastapi import APIRouter
from fastapi.responses import Response

from service.api.deps import BatcherDep, StateDep
from service.log import request_started
from service.schemas import ERROR_RESPONSES, JSONResponse, RankRequest, RankResponse, RequestModels


def router(models: RequestModels) -> APIRouter:
    RankBody = models.rank
    api = APIRouter(tags=["ranking"])

    @api.post(
        "/rank",
        response_model=RankResponse,
        responses=ERROR_RESPONSES,
        summary="Rank candidates for a user",
        description="Scores every candidate against the user's history (from Redis, or `history`) and "
        "returns them by predicted CTR, descending. If Redis is down the answer is still 200, with an "
        "empty history and `degraded: true`.",
    )
    async def rank(body: RankBody, batcher: BatcherDep, state: StateDep) -> Response:  # type: ignore[valid-type]
        req: RankRequest = body  # mypy cannot read a per-app class as a type; this is its base
        # The budget counts from the request's arrival (parsing and validation included).
        arrived = request_started.get() or time.perf_counter()
        deadline = arrived + state.settings.request_timeout_ms / 1000
        # Duplicates are scored once; the first occurrence keeps its place (it only matters for ties).
        candidates = list(dict.fromkeys(req.candidates))
        result = await batcher.submit(req.user_id, candidates, req.history, deadline)
        scores = result.scores
        order = np.argsort(-scores, kind="stable")  # descending; ties keep request order
        if req.top_k is not None:
            order = order[: req.top_k]
        values = scores[order].tolist()  # float32 -> python float
        items = [{"item_id": candidates[i], "score": v} for i, v in zip(order.tolist(), values, strict=True)]
        return JSONResponse(
            {
                "user_id": req.user_id,
                "model_version": result.model_version,
                "items": items,
                "history_length": result.history_length,
                "degraded": result.degraded is not None,
            }
        )

    return api
