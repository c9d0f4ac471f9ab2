"""POST /rank: score a user's candidates against their history and return them by CTR; with `explain`,
each item says which behaviours of the history weigh most in its score (DIN's attention weights)."""

# No `from __future__ import annotations` here: FastAPI reads the handler's annotations when the
# route is declared, and the body model is a local of `router()` (this app's, with its limits).

import time
from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import Response

from service.api.deps import BatcherDep, StateDep
from service.batcher import RankResult
from service.log import request_started
from service.schemas import ERROR_RESPONSES, JSONResponse, RankRequest, RankResponse, RequestModels

_UNEXPLAINED = (
    "nothing is explained: the user's history could not be read ({why}), so the scores rest on no "
    "behaviour at all"
)


def because(weights: np.ndarray, history: list[str], top: int) -> list[list[dict[str, Any]]]:
    """weights (n, L) float32, history (L,) newest first -> per row, the `top` behaviours with the
    largest weights, by weight descending (ties: the newer first)."""
    if weights.shape[1] == 0:
        return [[] for _ in range(weights.shape[0])]
    order = np.argsort(-weights, axis=1, kind="stable")[:, :top]  # (n, k)
    picked = np.take_along_axis(weights, order, axis=1).tolist()  # float32 -> python float
    return [
        [{"item_id": history[p], "position": p, "weight": w} for p, w in zip(ps, ws, strict=True)]
        for ps, ws in zip(order.tolist(), picked, strict=True)
    ]


def _explained(
    result: RankResult, order: list[int], top: int
) -> tuple[list[list[dict[str, Any]]], str | None]:
    """Per returned item its `because`, and why nothing is explained (or None)."""
    if result.degraded is not None or result.attention is None or result.history is None:
        return [[] for _ in order], _UNEXPLAINED.format(why=result.degraded or "no history")
    return because(result.attention[order], result.history, top), None


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
        "empty history and `degraded: true`. With `explain: true` each item gains `because`: the "
        "behaviours with the largest attention weights for it (at most `explain_top`); a degraded answer "
        "explains nothing (`explained: false`). A model exported before explanations existed answers "
        "`explain` with 422 cannot_explain.",
    )
    async def rank(body: RankBody, batcher: BatcherDep, state: StateDep) -> Response:  # type: ignore[valid-type]
        req: RankRequest = body  # mypy cannot read a per-app class as a type; this is its base
        # The budget counts from the request's arrival (parsing and validation included).
        arrived = request_started.get() or time.perf_counter()
        deadline = arrived + state.settings.request_timeout_ms / 1000
        if req.explain and not (ranker := state.live.current).can_explain:
            raise ranker.cannot_explain()  # at once; the batcher checks again (a reload may come between)
        # Duplicates are scored once; the first occurrence keeps its place (it only matters for ties).
        candidates = list(dict.fromkeys(req.candidates))
        result = await batcher.submit(req.user_id, candidates, req.history, deadline, explain=req.explain)
        scores = result.scores
        order = np.argsort(-scores, kind="stable")  # descending; ties keep request order
        if req.top_k is not None:
            order = order[: req.top_k]
        values = scores[order].tolist()  # float32 -> python float
        items = [{"item_id": candidates[i], "score": v} for i, v in zip(order.tolist(), values, strict=True)]
        answer: dict[str, Any] = {
            "user_id": req.user_id,
            "model_version": result.model_version,
            "items": items,
            "history_length": result.history_length,
            "degraded": result.degraded is not None,
        }
        if req.explain:
            reasons, note = _explained(result, order.tolist(), req.explain_top)
            for item, why in zip(items, reasons, strict=True):
                item["because"] = why
            answer["explained"] = note is None
            if note is not None:
                answer["explain_note"] = note
        return JSONResponse(answer)

    return api
