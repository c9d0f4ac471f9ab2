"""`create_app(settings)`: the FastAPI app. Its lifespan builds the heavy things on `app.state.din`
(an `AppState`): the model set (its `default` member's ONNX Runtime session), the Redis client (and a
private redis-server when no URL is set), the batcher; then warms the model up in the background, and
/readyz turns ready when that is done."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator

from fastapi import FastAPI

from contracts.errors import DinError
from service.api import api_router
from service.api.deps import AppState, refuse_reload_under_routing
from service.batcher import Batcher
from service.config import Settings
from service.errors import install_error_handlers
from service.impressions import ImpressionLog
from service.live import ModelSet, describe, load_measured
from service.metrics import Metrics
from service.middleware import CORS, AdmissionGate, BodyLimits, RequestContext
from service.ranker import Ranker
from service.routing import Router
from service.schemas import Limits, RequestLimits
from service.security import cors_origins, load_api_keys
from service.shadow import ShadowRunner
from service.store.client import async_client, redis_endpoint
from service.store.history import HistoryStore

log = logging.getLogger(__name__)


async def _warm_up(state: AppState, ranker: Ranker, gate: threading.Event | None) -> None:
    """Warm ORT up in a worker thread; /readyz is ready only afterwards."""
    state.not_ready_reason = "warming_up"
    try:
        if gate is not None:
            while not await asyncio.to_thread(gate.wait, 0.05):
                pass
        seconds = await asyncio.to_thread(ranker.warmup, state.settings.warmup_rounds)
        if state.router is not None:  # ready only once the fleet's routing (if any) is in force here
            await state.router.sync()
            state.router.start()
    except Exception:
        state.not_ready_reason = "warmup_failed"  # the detail is in the log, not in /readyz
        log.exception("warm-up failed; the service will not become ready")
        return
    state.metrics.warmup_seconds.set(seconds)
    state.metrics.ready.set(1)
    state.ready = True
    state.not_ready_reason = ""
    log.info("model warmed up in %.2fs (%d rounds); ready", seconds, state.settings.warmup_rounds)


def _reload_on_sighup(state: AppState, stack: contextlib.AsyncExitStack) -> None:
    """SIGHUP reloads the configured bundle (outcome in the log and `din_reloads_total`). Only the main
    thread's event loop can take signals: an app run elsewhere (tests, embedding) goes without."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            refuse_reload_under_routing(state)
            await state.live.reload(state.settings, state.metrics)
        except DinError as e:
            log.error("SIGHUP reload refused: %s", e.message)

    def on_signal() -> None:
        task = loop.create_task(reload())
        running.add(task)
        task.add_done_callback(running.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_signal)
    except (ValueError, RuntimeError, NotImplementedError):
        log.debug("not the main thread's event loop: SIGHUP does not reload here")
        return
    stack.callback(loop.remove_signal_handler, signal.SIGHUP)


def create_app(
    settings: Settings,
    *,
    ranker: Ranker | None = None,
    ranker_memory: int | None = None,
    warmup_gate: threading.Event | None = None,
) -> FastAPI:
    """Build the app. `ranker`: an already loaded model (`din serve` loads it first to fail fast).
    `ranker_memory`: the resident memory its load took (`load_measured`), for /admin/models.
    `warmup_gate`: warm-up starts only once this is set (lets an orchestrator or a test hold /readyz)."""
    state = AppState(settings=settings, metrics=Metrics(), live=ModelSet())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if ranker is not None:
                r, memory = ranker, ranker_memory
            else:
                r, memory = await asyncio.to_thread(load_measured, settings)
            state.live.swap(r)
            state.live.default.memory_bytes = memory
            state.store, redis_url = await _open_store(state, stack)
            state.impressions = _start_impression_log(state, stack, redis_url)
            state.batcher = _start_batcher(state, stack)
            state.shadows = _start_shadows(state, stack)
            state.router = _start_router(state, stack)
            describe(state.metrics, r)
            _reload_on_sighup(state, stack)
            warm = asyncio.create_task(_warm_up(state, r, warmup_gate))
            try:
                yield
            finally:
                warm.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warm
                state.begin_shutdown()

    app = FastAPI(
        title="din-rank",
        summary="Online CTR ranking with a Deep Interest Network on ONNX Runtime, histories in Redis.",
        version="0.1.0",
        lifespan=lifespan,
        # served by service.api.docs instead, behind the API keys when they are set
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.din = state
    keys = load_api_keys(settings)  # ConfigError when DIN_API_KEYS_FILE cannot be read
    app.include_router(api_router(keys, metrics_auth=settings.metrics_auth))
    install_error_handlers(app)
    _add_middleware(app, state)
    return app


async def _open_store(state: AppState, stack: contextlib.AsyncExitStack) -> tuple[HistoryStore, str]:
    """The Redis endpoint (a private redis-server when no URL is set), its client and the HistoryStore
    over it, each closed by `stack`: (the store, the endpoint's URL)."""
    redis_cfg = state.settings.redis
    endpoint = await asyncio.to_thread(stack.enter_context, redis_endpoint(redis_cfg))
    if endpoint.private:
        where = redis_cfg.private_data_dir
        log.info("started a private redis-server at %s (data in %s)", endpoint.url, where)
    client = async_client(endpoint.url, redis_cfg)
    stack.push_async_callback(client.aclose)
    store = HistoryStore(client, redis_cfg.prefix, read_from_replicas=redis_cfg.read_from_replicas)
    stack.push_async_callback(store.aclose)
    if store.breaker is not None:  # din_redis_up follows it between /readyz pings
        store.breaker.on_change = lambda up: state.metrics.redis_up.set(int(up))
    return store, endpoint.url


def _start_impression_log(
    state: AppState, stack: contextlib.AsyncExitStack, redis_url: str
) -> ImpressionLog | None:
    """With DIN_LOG_IMPRESSIONS: the impression log's writer thread (its own client on `redis_url`, the
    store's endpoint), started now, stopped by `stack` after the batcher (its last answers are logged)
    and before the store closes."""
    settings = state.settings
    if not settings.log_impressions:
        return None
    assert state.store is not None
    impressions = ImpressionLog(state.store, settings, state.metrics, url=redis_url)
    impressions.start()
    stack.push_async_callback(impressions.stop)
    log.info(
        "impression log on: sample rate %g, ~%d per stream over %d stream(s), buffer %d",
        settings.log_sample_rate,
        impressions.maxlen,
        impressions.shards,
        settings.log_buffer,
    )
    return impressions


def _start_batcher(state: AppState, stack: contextlib.AsyncExitStack) -> Batcher:
    """The batcher over the model set and the store, started now and stopped by `stack`."""
    settings = state.settings
    assert state.store is not None
    batcher = Batcher(
        state.live,
        state.store,
        state.metrics,
        max_delay_s=settings.batch_max_delay_ms / 1000,
        max_candidates=settings.batch_max_candidates,
        queue_max=settings.queue_max,
        max_inflight=settings.inflight_batches,
        workers=settings.workers,
    )
    batcher.start()
    log.info(
        "inference: %d workers x %d ONNX Runtime threads, %d batches in flight",
        settings.workers,
        settings.threads_per_call,
        settings.inflight_batches,
    )
    stack.push_async_callback(batcher.stop)
    return batcher


def _start_shadows(state: AppState, stack: contextlib.AsyncExitStack) -> ShadowRunner:
    """Shadow scoring (service.shadow), stopped by `stack` before the batcher and the impression log."""
    settings = state.settings
    shadows = ShadowRunner(
        state.metrics,
        state.impressions,
        queue_max=settings.shadow_queue_max,
        max_age_s=settings.shadow_max_age_ms / 1000,
        max_candidates=settings.batch_max_candidates,
        yield_to_served=settings.shadow_yield,
    )
    if shadows.served_work is not None and state.batcher is not None:
        state.batcher.inference.on_scoring = shadows.served_work.set  # what the shadows give way to
    shadows.start()
    stack.push_async_callback(shadows.stop)
    return shadows


def _start_router(state: AppState, stack: contextlib.AsyncExitStack) -> Router:
    """The routing of model versions (service.routing) over the store's client. Its first read and its
    polling start with the warm-up (`_warm_up`); `stack` stops the polling first."""
    assert state.store is not None and state.batcher is not None
    batcher = state.batcher
    router = Router(
        state.live,
        state.settings,
        state.metrics,
        state.store.client,
        busy=lambda name: batcher.queue.lane_depth(name) > 0,
    )
    stack.push_async_callback(router.stop)
    return router


def _add_middleware(app: FastAPI, state: AppState) -> None:
    """Added innermost first: RequestContext (request id, access log, metrics, JSON 500) wraps the rest,
    so BodyLimits' 408 / 413 and AdmissionGate's 503 carry the request id and are counted like any
    other answer; the gate sits inside BodyLimits, so a body it drains unread is still bounded.
    RequestLimits, innermost, puts this app's request limits in force for the request models."""
    settings = state.settings
    app.add_middleware(RequestLimits, limits=Limits.of(settings))
    app.add_middleware(
        AdmissionGate, queue=lambda: state.batcher, budget_s=settings.request_budget_s, paths={"/rank"}
    )
    app.add_middleware(
        BodyLimits, max_bytes=settings.max_body_bytes, read_timeout_s=settings.request_read_timeout_s
    )
    if origins := cors_origins(settings):  # no CORS headers at all unless DIN_CORS_ORIGINS is set
        app.add_middleware(
            CORS,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContext, metrics=state.metrics)
