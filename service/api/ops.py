"""Operations: liveness, readiness, Prometheus metrics, and the served bundle's manifest.

Three routers, so that `service.api.api_router` can leave the probes open (orchestrators and load
balancers hold no API key), /metrics open unless DIN_METRICS_AUTH, and the manifest behind the keys."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from model.errors import NotReady
from service.api.deps import LiveDep, StateDep
from service.metrics import CONTENT_TYPE
from service.schemas import ErrorBody, JSONResponse

probes = APIRouter(tags=["ops"])  # never behind API keys
metrics_router = APIRouter(tags=["ops"])  # behind them only with DIN_METRICS_AUTH
router = APIRouter(tags=["ops"])  # behind them, like every other route


@probes.get("/healthz", summary="Process is alive")
async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


@probes.get(
    "/readyz",
    summary="Model warmed up and Redis answering",
    responses={
        503: {
            "model": ErrorBody,
            "description": "not_ready; `reason` says why (warming_up, redis_unavailable, shutting_down, ...)",
        }
    },
)
async def readyz(state: StateDep) -> Response:
    if not state.ready or state.store is None or not state.live.loaded:
        raise NotReady(f"not ready: {state.not_ready_reason}", reason=state.not_ready_reason)
    try:
        async with asyncio.timeout(state.settings.redis_timeout_ms / 1000 + 0.5):
            ok = await state.store.ping()
    except TimeoutError:
        ok = False
    if not ok:
        raise NotReady("not ready: redis is not answering", reason="redis_unavailable")
    return JSONResponse({"status": "ready", "model_version": state.live.current.model_version})


@metrics_router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(state: StateDep) -> Response:
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/model", summary="The bundle's manifest")
async def model_info(live: LiveDep) -> Response:
    return JSONResponse(live.current.bundle.manifest)
