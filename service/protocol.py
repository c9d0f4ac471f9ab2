"""The HTTP/1.1 connection under the app: what uvicorn does not bound on its own, bounded here.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`, DIN_KEEP_ALIVE_TIMEOUT_S), but it
has no deadline for a request's head (request line and headers): a connection that opens and sends
nothing, or trickles its headers a byte at a time, is held for ever (slowloris). With httptools (its
default parser when installed) the head has no size limit either; h11 stops at 16 KiB. The app cannot
help: it is called only once the head is complete.

`protocol_class(head_timeout_s)` is uvicorn's own protocol class (httptools, or h11 without it) with
`HeadLimits` mixed in:

- a new connection must deliver a complete head within `head_timeout_s` of opening; on a kept-alive
  connection the next head must be complete `head_timeout_s` after its first byte (the idle time
  before that first byte is the keep-alive timeout's business). Late: 408 request_timeout, closed; a
  new connection that sent nothing at all is closed without an answer.
- a head larger than `MAX_HEAD_BYTES` (counted over the reads that leave it incomplete, so one read
  of up to 256 KiB may overshoot) answers 431 headers_too_large, closed.

These answers are the service's JSON error body with a fresh request id (logged), written straight to
the socket: the app, its access log and its metrics never see these requests. The body's own deadline
and size are `service.middleware.BodyLimits`' (pure ASGI).

`uvicorn_options(settings)`: the uvicorn.Config arguments that follow from Settings. `din serve` and the
tests build their server with them.
"""

from __future__ import annotations

import asyncio
import http
import logging
import uuid
from typing import Any

import orjson

from contracts.errors import DinError, HeadersTooLarge, RequestTimeout
from service.config import Settings
from service.errors import http_status
from service.log import request_id

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; h11's own default is 16 KiB, nginx's 32 KiB


class HeadLimits:
    """A deadline and a size limit for each request's head. Mixed in before one of uvicorn's HTTP/1.1
    protocol classes, whose `loop`, `transport` and `cycle` (the request in progress) it reads."""

    head_timeout_s: float = 10.0
    max_head_bytes: int = MAX_HEAD_BYTES

    # uvicorn's protocol provides these
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0  # bytes of a head still incomplete
    _head_begun = False  # bytes of the next request have arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        awaiting = self._awaiting_head()
        if awaiting and data and not self._head_begun:
            self._head_begun = True
            if self._head_timer is None:  # kept alive: the deadline counts from the head's first byte
                self._arm()
        super().data_received(data)  # type: ignore[misc]
        if not awaiting or self.transport.is_closing():
            return
        if self._awaiting_head():  # the head is still incomplete after this read
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                too_large = HeadersTooLarge(
                    f"request line and headers are larger than the limit of {self.max_head_bytes} bytes",
                    limit_bytes=self.max_head_bytes,
                )
                self._refuse(too_large)
        else:
            self._head_bytes = 0
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # Idle until the next request's first byte: that wait is the keep-alive timeout's.
        self._disarm()
        self._head_begun = False
        self._head_bytes = 0

    # ------------------------------------------------------------------ internals

    def _awaiting_head(self) -> bool:
        cycle = self.cycle
        return cycle is None or bool(cycle.response_complete)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._awaiting_head():
            return
        if not self._head_begun:  # a connection that never sent a byte: nothing to answer
            self.transport.close()
            return
        self._refuse(
            RequestTimeout(
                f"the request line and headers did not arrive within {self.head_timeout_s:g}s",
                timeout_s=self.head_timeout_s,
            )
        )

    def _refuse(self, exc: DinError) -> None:
        """Write `exc` as the JSON error body (with a fresh request id, logged) and close."""
        self._disarm()
        rid = uuid.uuid4().hex
        token = request_id.set(rid)
        status = http_status(exc)
        try:
            log.info("%d %s: %s", status, exc.code, exc.message, extra={"status": status})
        finally:
            request_id.reset(token)
        body = orjson.dumps({**exc.body(), "request_id": rid})
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            f"x-request-id: {rid}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode("latin-1") + body)
        self.transport.close()


def protocol_class(
    head_timeout_s: float, max_head_bytes: int = MAX_HEAD_BYTES, *, base: type[asyncio.Protocol] | None = None
) -> type[asyncio.Protocol]:
    """`base` (default: uvicorn's choice, httptools when installed, else h11) with `HeadLimits`."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    attrs = {"head_timeout_s": head_timeout_s, "max_head_bytes": max_head_bytes}
    return type(f"HeadLimited{base.__name__}", (HeadLimits, base), attrs)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.Config arguments that follow from Settings (everything else is the caller's)."""
    return {
        "http": protocol_class(settings.request_read_timeout_s),
        "timeout_keep_alive": settings.keep_alive_timeout_s,  # a float works: it goes to call_later
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,  # the same head limit when h11 parses
    }
