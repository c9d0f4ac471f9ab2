"""HTTP routes, their typed dependencies, and the one place errors become HTTP responses."""

from __future__ import annotations

import asyncio
import inspect
import logging
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import Batcher
from service.config import Settings
from service.errors import DinError, NotReady, ServiceUnavailable, StoreDown
from service.log import request_id
from service.metrics import CONTENT_TYPE, Metrics
from service.ranker import Ranker
from service.schemas import (
    ERROR_RESPONSES,
    EventsRequest,
    EventsResponse,
    RankRequest,
    RankResponse,
    RequestModels,
)
from service.store import HistoryStore, StoreUnavailable

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What the lifespan builds; kept on app.state.runtime and reached through `get_runtime`."""

    settings: Settings
    metrics: Metrics
    ranker: Ranker | None = None
    store: HistoryStore | None = None
    batcher: Batcher | None = None
    ready: bool = False  # model loaded and warmed up
    not_ready_reason: str = "starting"
    extra: dict[str, Any] = field(default_factory=dict)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def get_runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def get_serving(request: Request) -> tuple[Ranker, HistoryStore, Batcher]:
    rt = get_runtime(request)
    if rt.ranker is None or rt.store is None or rt.batcher is None:
        raise NotReady("the model is not loaded yet", reason="starting")
    return rt.ranker, rt.store, rt.batcher


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ServingDep = Annotated[tuple[Ranker, HistoryStore, Batcher], Depends(get_serving)]


# ------------------------------------------------------------------ handlers


async def rank(body: RankRequest, serving: ServingDep) -> Response:
    ranker, _, batcher = serving
    # Duplicates are scored once; the first occurrence keeps its place (it only matters for ties).
    candidates = list(dict.fromkeys(body.candidates))
    result = await batcher.submit(body.user_id, candidates, body.history)
    scores = result.scores
    order = np.argsort(-scores, kind="stable")  # descending; ties keep request order
    if body.top_k is not None:
        order = order[: body.top_k]
    values = scores[order].tolist()  # float32 -> python float
    items = [{"item_id": candidates[i], "score": v} for i, v in zip(order.tolist(), values, strict=True)]
    return JSONResponse(
        {
            "user_id": body.user_id,
            "model_version": ranker.bundle.model_version,
            "items": items,
            "history_length": result.history_length,
            "degraded": result.degraded is not None,
        }
    )


async def events(body: EventsRequest, serving: ServingDep, rt: RuntimeDep) -> Response:
    _, store, _ = serving
    evs = body.events
    # Oldest first for the store; stable, and an event without ts counts as the newest.
    order = sorted(range(len(evs)), key=lambda i: (evs[i].ts is None, evs[i].ts or 0.0))
    pairs = [(evs[i].user_id, evs[i].item_id) for i in order]
    t0 = asyncio.get_running_loop().time()
    try:
        written = await store.append_events(pairs)
    except StoreUnavailable as e:
        raise StoreDown(f"redis is unavailable, nothing was written: {e}") from e
    finally:
        rt.metrics.redis_latency.labels(op="append_events").observe(asyncio.get_running_loop().time() - t0)
    rt.metrics.events_written.inc(written)
    return JSONResponse({"written": written})


def _with_body(endpoint: Callable[..., Any], model: type) -> Callable[..., Any]:
    """Give `endpoint` a signature whose `body` is `model` (a per-app subclass carrying the limits)."""
    hints = typing.get_type_hints(endpoint, include_extras=True)
    sig = inspect.signature(endpoint)
    params = [
        p.replace(annotation=model if p.name == "body" else hints[p.name]) for p in sig.parameters.values()
    ]
    endpoint.__signature__ = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)  # type: ignore[attr-defined]
    return endpoint


def build_router(models: RequestModels) -> APIRouter:
    router = APIRouter()

    # Per-app copies of the handlers: their signatures name this app's request models.
    async def rank_endpoint(body: RankRequest, serving: ServingDep) -> Response:
        return await rank(body, serving)

    async def events_endpoint(body: EventsRequest, serving: ServingDep, rt: RuntimeDep) -> Response:
        return await events(body, serving, rt)

    router.add_api_route(
        "/rank",
        _with_body(rank_endpoint, models.rank),
        methods=["POST"],
        response_model=RankResponse,
        responses=ERROR_RESPONSES,
        summary="Rank candidates for a user",
        description="Scores every candidate against the user's history (from Redis, or `history`) and "
        "returns them by predicted CTR, descending. If Redis is down the answer is still 200, with an "
        "empty history and `degraded: true`.",
        tags=["ranking"],
    )
    router.add_api_route(
        "/events",
        _with_body(events_endpoint, models.events),
        methods=["POST"],
        response_model=EventsResponse,
        responses=ERROR_RESPONSES,
        summary="Append behaviours to users' histories",
        description="One MULTI/EXEC: all events are written or none. Redis down: 503, nothing written.",
        tags=["ranking"],
    )
    router.add_api_route("/healthz", healthz, methods=["GET"], tags=["ops"], summary="Process is alive")
    router.add_api_route(
        "/readyz", readyz, methods=["GET"], tags=["ops"], summary="Model warmed up and Redis answering"
    )
    router.add_api_route("/metrics", metrics, methods=["GET"], tags=["ops"], summary="Prometheus metrics")
    router.add_api_route("/model", model_info, methods=["GET"], tags=["ops"], summary="The bundle's manifest")
    return router


async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(rt: RuntimeDep) -> Response:
    if not rt.ready or rt.store is None or rt.ranker is None:
        raise NotReady(f"not ready: {rt.not_ready_reason}", reason=rt.not_ready_reason)
    try:
        async with asyncio.timeout(rt.settings.redis_timeout_ms / 1000 + 0.5):
            ok = await rt.store.ping()
    except TimeoutError:
        ok = False
    if not ok:
        raise NotReady("not ready: redis is not answering", reason="redis_unavailable")
    return JSONResponse({"status": "ready", "model_version": rt.ranker.bundle.model_version})


async def metrics(rt: RuntimeDep) -> Response:
    if rt.batcher is not None:
        rt.metrics.queue_depth.set(rt.batcher.depth)
    return Response(rt.metrics.render(), media_type=CONTENT_TYPE)


async def model_info(rt: RuntimeDep) -> Response:
    if rt.ranker is None:
        raise NotReady("the model is not loaded yet", reason="starting")
    return JSONResponse(rt.ranker.bundle.manifest)


# ------------------------------------------------------------------ errors: one place


def error_response(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> Response:
    body = {**body, "request_id": request_id.get()}
    return JSONResponse(body, status_code=status, headers=headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _validation_detail(exc: RequestValidationError) -> list[dict[str, str]]:
    detail = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            detail.append({"field": "body", "message": f"invalid JSON: {ctx.get('error', err.get('msg'))}"})
            continue
        detail.append({"field": _field(err.get("loc", ())), "message": str(err.get("msg", "invalid"))})
    return detail


def install_error_handlers(app: FastAPI) -> None:
    async def on_din_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DinError)
        if exc.status >= 500 and not isinstance(exc, ServiceUnavailable):
            log.error("%s: %s", exc.code, exc.message)
        return error_response(exc.status, exc.body(), exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        detail = _validation_detail(exc)
        fields = ", ".join(dict.fromkeys(d["field"] for d in detail))
        return error_response(
            422, {"error": "validation_error", "message": f"invalid request: {fields}", "detail": detail}
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, {"error": code, "message": str(exc.detail)}, exc.headers)

    app.add_exception_handler(DinError, on_din_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
