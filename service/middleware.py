"""Request context as pure ASGI middleware: the request id (honoured or generated, echoed, in every log
line), the access log, request metrics labelled by route, and a JSON 500 (never a traceback) for
anything unexpected."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response
from service.log import request_id
from service.metrics import Metrics

log = logging.getLogger(__name__)

_QUIET = frozenset({"/healthz", "/readyz", "/metrics"})  # probes: access-logged at DEBUG only
_REQUEST_ID = re.compile(r"^[\w.:\-/+=]{1,128}$")


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._paths: frozenset[str] | None = None

    def _route_label(self, scope: Scope) -> str:
        """Every route the app declares is its own label (no list here to keep in step); paths that
        match no route share "other", so arbitrary URLs cannot grow the metric's cardinality."""
        matched = scope.get("route")  # set by the router for API routes (path templates included)
        if matched is not None:
            return str(matched.path)
        if self._paths is None:  # plain routes (/docs, /openapi.json) do not set it
            self._paths = frozenset(str(getattr(r, "path", "")) for r in scope["app"].routes)
        path: str = scope["path"]
        return path if path in self._paths else "other"

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
                body = {"error": "internal_error", "message": "internal server error"}
                await error_response(500, body)(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - t0
            path = scope["path"]
            route = self._route_label(scope)
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
