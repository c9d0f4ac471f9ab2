"""`create_app(settings)`: the FastAPI app. Its lifespan builds the heavy things on app.state.runtime:
the ONNX Runtime session, the Redis client (and a private redis-server when no URL is set), the
batcher; then warms the model up in the background, and /readyz turns ready when that is done."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batcher import Batcher
from service.config import Settings
from service.log import request_id
from service.metrics import Metrics
from service.ranker import Ranker, load_bundle
from service.routes import Runtime, build_router, error_response, install_error_handlers
from service.schemas import request_models
from service.store import HistoryStore, make_client

log = logging.getLogger(__name__)

ROUTES = frozenset(
    {"/rank", "/events", "/healthz", "/readyz", "/metrics", "/model", "/docs", "/openapi.json"}
)
_QUIET = frozenset({"/healthz", "/readyz", "/metrics"})  # probes: access-logged at DEBUG only
_REQUEST_ID = re.compile(r"^[\w.:\-/+=]{1,128}$")


class RequestContext:
    """Pure ASGI middleware: request id (honoured or generated, echoed, in every log line), access
    log, request metrics, and a JSON 500 (never a traceback) for anything unexpected."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value.decode("latin-1")
                break
        if rid is None or not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        token = request_id.set(rid)
        t0 = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            status = 500
            if not started:
                response = error_response(
                    500, {"error": "internal_error", "message": "internal server error"}
                )
                await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - t0
            path = scope["path"]
            route = path if path in ROUTES else "other"
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_latency.labels(route=route).observe(elapsed)
            ms = round(elapsed * 1000, 3)
            log.log(
                logging.DEBUG if path in _QUIET and status < 400 else logging.INFO,
                "%s %s %d %.2fms",
                scope["method"],
                path,
                status,
                ms,
                extra={"method": scope["method"], "path": path, "status": status, "duration_ms": ms},
            )
            request_id.reset(token)


async def _warm_up(rt: Runtime, ranker: Ranker, gate: threading.Event | None) -> None:
    """Warm ORT up in a worker thread; /readyz is ready only afterwards."""
    rt.not_ready_reason = "warming_up"
    try:
        if gate is not None:
            while not await asyncio.to_thread(gate.wait, 0.05):
                pass
        seconds = await asyncio.to_thread(ranker.warmup, rt.settings.warmup_rounds)
    except Exception as e:
        rt.not_ready_reason = f"warm-up failed: {e}"
        log.exception("warm-up failed; the service will not become ready")
        return
    rt.metrics.warmup_seconds.set(seconds)
    rt.metrics.ready.set(1)
    rt.ready = True
    rt.not_ready_reason = ""
    log.info("model warmed up in %.2fs (%d rounds); ready", seconds, rt.settings.warmup_rounds)


def create_app(
    settings: Settings,
    *,
    ranker: Ranker | None = None,
    warmup_gate: threading.Event | None = None,
) -> FastAPI:
    """Build the app. `ranker`: an already loaded model (`din serve` loads it first to fail fast).
    `warmup_gate`: warm-up starts only once this is set (lets an orchestrator or a test hold /readyz)."""
    metrics = Metrics()
    runtime = Runtime(settings=settings, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            r = ranker
            if r is None:
                bundle = await asyncio.to_thread(load_bundle, settings.bundle)
                r = await asyncio.to_thread(
                    Ranker,
                    bundle,
                    providers=settings.provider_list,
                    intra_op_threads=settings.intra_op_threads,
                )
            url = settings.redis_url
            if url is None:
                from service.redis_server import DEFAULT_REDIS_DATA, EmbeddedRedis

                server = EmbeddedRedis(settings.redis_data or DEFAULT_REDIS_DATA)
                await asyncio.to_thread(server.start)
                stack.callback(server.stop)
                url = server.url
                log.info("started a private redis-server at %s (data in %s)", url, server.data_dir)
            client = make_client(
                url,
                connect_timeout=settings.redis_connect_timeout_ms / 1000,
                timeout=settings.redis_timeout_ms / 1000,
                max_connections=settings.redis_max_connections,
            )
            stack.push_async_callback(client.aclose)
            store = HistoryStore(client, settings.redis_prefix, r.max_history)
            batcher = Batcher(
                r,
                store,
                metrics,
                max_delay_s=settings.batch_max_delay_ms / 1000,
                max_candidates=settings.batch_max_candidates,
                queue_max=settings.queue_max,
                max_inflight=settings.max_inflight_batches,
            )
            batcher.start()
            stack.push_async_callback(batcher.stop)
            runtime.ranker, runtime.store, runtime.batcher = r, store, batcher
            manifest: dict[str, Any] = r.bundle.manifest
            metrics.model_info.info(
                {
                    "model_version": r.bundle.model_version,
                    "format_version": str(manifest.get("format_version", "")),
                    "max_history": str(r.max_history),
                    "providers": ",".join(r.providers),
                }
            )
            log.info(
                "loaded bundle %s model_version=%s providers=%s",
                r.bundle.path,
                r.bundle.model_version,
                ",".join(r.providers),
            )
            warm = asyncio.create_task(_warm_up(runtime, r, warmup_gate))
            try:
                yield
            finally:
                warm.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warm
                runtime.ready = False
                runtime.not_ready_reason = "shutting_down"
                metrics.ready.set(0)

    models = request_models(settings)
    app = FastAPI(
        title="din-rank",
        summary="Online CTR ranking with a Deep Interest Network on ONNX Runtime, histories in Redis.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.include_router(build_router(models))
    install_error_handlers(app)
    app.add_middleware(RequestContext, metrics=metrics)
    return app
