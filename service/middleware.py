"""Request context as pure ASGI middleware: the request id (honoured or generated, echoed, in every log
line), the access log, request metrics labelled by route, and a JSON 500 (never a traceback) for
anything unexpected. `BodyLimits`, inside it, bounds the request body (size and arrival time) before
anything parses it; `CORS` (when DIN_CORS_ORIGINS is set) sits between the two."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, Protocol

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts.errors import CorsRefused, DinError, Overloaded, PayloadTooLarge, RequestTimeout
from service.errors import din_error_response, error_response
from service.log import request_deadline, request_id, request_started
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
        if self._paths is None:  # refused before routing (405, 413) or plain routes: by the path
            self._paths = frozenset(_route_paths(scope["app"].routes))
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
        arrived = request_started.set(t0)
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
            request_started.reset(arrived)


def _route_paths(routes: Iterable[Any]) -> Iterator[str]:
    """The paths of every route, looking into included routers (FastAPI keeps those as wrappers)."""
    for route in routes:
        if isinstance(getattr(route, "path", None), str):
            yield route.path
        inner = getattr(getattr(route, "original_router", route), "routes", None)
        if inner is not None and inner is not routes:
            yield from _route_paths(inner)


async def refuse(exc: DinError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer `exc` as the JSON error body and close the connection: the rest of the request (its body)
    is never read, so the connection cannot carry another request."""
    await din_error_response(exc, {"Connection": "close"})(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # the HTTP parser refuses these before the app sees them
                return None
    return None


class BodyLimits:
    """The request body, bounded before anything parses it (pure ASGI, inside `RequestContext`, so its
    answers carry the request id and are logged and counted like any other).

    - Size: a Content-Length above `max_bytes` answers 413 payload_too_large at once, the body unread;
      a body without one (chunked) is counted as it streams and refused as soon as it passes the limit.
    - Time: a body that has not fully arrived `read_timeout_s` after the request's head answers 408
      request_timeout (a slow or stalled client cannot hold a request open).

    Either answer closes the connection. The app then sees the client as gone (`http.disconnect`), and
    whatever it answers to that is dropped. The server reads at most a socket buffer or so past the
    limit (uvicorn stops reading a body nobody asks for at 64 KiB), never the whole body.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            too_large = PayloadTooLarge(
                f"request body of {length} bytes is larger than the limit of {self.max_bytes} bytes",
                limit_bytes=self.max_bytes,
            )
            await refuse(too_large, scope, receive, send)
            return

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        received = 0
        complete = False  # the whole body has arrived
        answered = False  # refused here: the app's own answer is dropped
        started = False  # the app started its answer: too late to refuse

        async def bounded_receive() -> Message:
            nonlocal received, complete, answered
            if answered:
                return {"type": "http.disconnect"}
            if complete:
                return await receive()  # only a disconnect can come now
            error: DinError
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                error = RequestTimeout(
                    f"the request body did not arrive within {self.read_timeout_s:g}s",
                    timeout_s=self.read_timeout_s,
                )
            else:
                if message["type"] != "http.request":
                    return message
                received += len(message.get("body", b""))
                if received <= self.max_bytes:
                    complete = not message.get("more_body", False)
                    return message
                error = PayloadTooLarge(
                    f"request body is larger than the limit of {self.max_bytes} bytes",
                    limit_bytes=self.max_bytes,
                )
            if not started:
                answered = True
                await refuse(error, scope, receive, send)
            return {"type": "http.disconnect"}

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, bounded_receive, guarded_send)


class CORS(CORSMiddleware):
    """Starlette's CORS middleware, whose refused preflight answers the service's JSON error body
    (400 cors_refused, with the request id) instead of plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers=request_headers)
        if response.status_code < 400:
            return response
        refused = CorsRefused(bytes(response.body).decode("latin-1"))  # "Disallowed CORS origin, method"
        cors = {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}
        return din_error_response(refused, cors)


class Admission(Protocol):
    """What the gate asks of the queue (service.batcher.Batcher)."""

    def admits(self, deadline: float) -> bool: ...  # can a typical request be answered by `deadline`?

    def shed(self, reason: str) -> Overloaded: ...  # count a refusal, return its answer


class AdmissionGate:
    """Load shedding before any parsing: under overload most requests must be refused, and cheaply.

    A `POST` to one of `paths` that the queue expects to miss its deadline with a typical request's
    candidates (`Admission.admits`) is answered 503 overloaded (Retry-After) at once: its body is
    drained unread (so the connection can carry the next request) and never validated. What passes is
    judged again by the batcher with its exact candidate count. Inside `BodyLimits`, so a drained body
    is still bounded. `queue()` is None until the lifespan built it: nothing is refused then.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        queue: Callable[[], Admission | None],
        budget_s: float,
        paths: Collection[str],
    ) -> None:
        self.app = app
        self.queue = queue
        self.budget_s = budget_s
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        queue = self.queue()
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in self.paths
            and queue is not None
            and not queue.admits(request_deadline(self.budget_s))
        ):
            more = True
            while more:  # drain the body unread
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                more = message.get("more_body", False)
            exc = queue.shed("deadline")
            await din_error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)
