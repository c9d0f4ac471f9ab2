"""Operations: liveness, readiness, Prometheus metrics, and the served bundle's manifest.

Three routers, so that `service.api.api_router` can leave the probes open (orchestrators and load
balancers hold no API key), /metrics open unless DIN_METRICS_AUTH, and the manifest behind the keys."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from contracts.errors import NotReady
from service.api.deps import AppState, LiveDep, StateDep
from service.live import DEFAULT_MODEL
from service.metrics import CONTENT_TYPE
from service.schemas import ErrorBody, JSONResponse

probes = APIRouter(tags=["ops"])  # never behind API keys
metrics_router = APIRouter(tags=["ops"])  # behind them only with DIN_METRICS_AUTH
router = APIRouter(tags=["ops"])  # behind them, like every other route


@probes.get("/healthz", summary="Process is alive")
async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


async def redis_answers(state: AppState) -> bool:
    """Ping Redis within the read timeout (+0.5 s); the answer also sets din_redis_up. Only /readyz
    pings (balancers and probes call it every few seconds): a scrape of /metrics never waits on Redis."""
    ok = False
    if state.store is not None:
        try:
            async with asyncio.timeout(state.settings.redis_timeout_ms / 1000 + 0.5):
                ok = await state.store.ping()
        except TimeoutError:
            ok = False
    state.metrics.redis_up.set(int(ok))
    return ok


@probes.get(
    "/readyz",
    summary="This replica can answer: model loaded and warm, not draining (Redis reported, not required)",
    responses={
        503: {
            "model": ErrorBody,
            "description": "not_ready; `reason`: starting, warming_up, warmup_failed or shutting_down",
        }
    },
)
async def readyz(state: StateDep) -> Response:
    """Ready means a request sent here gets an answer: the model is loaded and warm and the replica is
    not draining. `model_version` is the default member's, `models` every member's version by name.
    Redis is reported (`redis`: up or down, and din_redis_up), not required: while it is
    down /rank answers 200 `degraded` (a cold-start ranking), so a balancer or a Kubernetes Service
    that kept only replicas with Redis would drop the whole fleet at once in an outage."""
    if not state.ready or state.store is None or not state.live.loaded:
        raise NotReady(f"not ready: {state.not_ready_reason}", reason=state.not_ready_reason)
    redis_up = await redis_answers(state)
    current = state.live.current
    body = {"status": "ready", "model_version": current.model_version, "precision": current.precision}
    redis = {"redis": "up" if redis_up else "down", "degraded": not redis_up}
    return JSONResponse({**body, **redis, "models": state.live.versions()})


@metrics_router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(state: StateDep) -> Response:
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/model", summary="The bundle's manifest (the default member of the model set)")
async def model_info(live: LiveDep) -> Response:
    return JSONResponse(live.current.bundle.manifest)


@router.get("/models", summary="Every member of the model set: its version and bundle")
async def models(live: LiveDep) -> Response:
    """Per member (by name; today one, `default`): the model version, the bundle directory, T and
    whether it can explain. A member still loading is absent."""
    members = {
        m.name: {
            "model_version": m.current.model_version,
            "bundle": str(m.current.bundle.path),
            "max_history": m.current.max_history,
            "can_explain": m.current.can_explain,
            **m.current.describe_precision(),
        }
        for m in live
        if m.loaded
    }
    return JSONResponse({"default": DEFAULT_MODEL, "models": members})
