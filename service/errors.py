"""Where errors become HTTP responses, in one place. The tree itself is `contracts.errors` (codes,
no statuses); the statuses and headers each answers with are here:

    DinError 500 · RequestRefused 400 (CorsRefused) · Unauthorized 401 + WWW-Authenticate: Bearer ·
    NotFound 404 · RequestTimeout 408 · ReloadInProgress 409 · RoutingConflict 409 · PayloadTooLarge 413 ·
    CannotExplain 422 · ReloadRejected 422 · RoutingError 422 · HeadersTooLarge 431 ·
    ServiceUnavailable 503 (Overloaded + Retry-After, StoreDown, StoreTimeout, StorePartial, NotReady,
    ShuttingDown) · ReloadFailed, InferenceFailed 500

Every error answers the same JSON body: {"error": code, "message": text, "request_id": id, ...}.
A `DinError` answers its status (`http_status`) and code; a request that fails validation answers
422 naming each bad field; routing errors (404, 405) keep their status. Anything else is the
middleware's JSON 500 (`service.middleware`), never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from contracts.errors import (
    CannotExplain,
    DinError,
    HeadersTooLarge,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ReloadInProgress,
    ReloadRejected,
    RequestRefused,
    RequestTimeout,
    RoutingConflict,
    RoutingError,
    ServiceUnavailable,
    Unauthorized,
)
from service.log import request_id
from service.schemas import JSONResponse

log = logging.getLogger(__name__)

# An error answers the status of the nearest class in its MRO listed here (DinError's at the least).
STATUS: dict[type[DinError], int] = {
    DinError: 500,
    RequestRefused: 400,
    Unauthorized: 401,
    NotFound: 404,
    RequestTimeout: 408,
    ReloadInProgress: 409,
    RoutingConflict: 409,
    PayloadTooLarge: 413,
    CannotExplain: 422,
    ReloadRejected: 422,
    RoutingError: 422,
    HeadersTooLarge: 431,
    ServiceUnavailable: 503,
}


def http_status(exc: DinError) -> int:
    """The HTTP status `exc` answers with."""
    return next(STATUS[cls] for cls in type(exc).__mro__ if cls in STATUS)


def http_headers(exc: DinError) -> dict[str, str]:
    """The headers `exc` answers with: how to authenticate, when to retry."""
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(exc.retry_after_s)}
    return {}


def din_error_response(exc: DinError, headers: Mapping[str, str] | None = None) -> Response:
    """`exc` as its status, its headers (and `headers`) and the JSON error body."""
    return error_response(http_status(exc), exc.body(), {**http_headers(exc), **(headers or {})})


def error_response(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> Response:
    body = {**body, "request_id": request_id.get()}
    return JSONResponse(body, status_code=status, headers=headers)


# A 422 names each bad field, never the input itself, and not at any length: the client's own JSON keys
# (an unknown field) are cut short, and only the first errors are listed.
_MAX_DETAIL = 10
_MAX_NAME = 64


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            name = _short(str(p), _MAX_NAME)
            out += f".{name}" if out else name
    return out or "body"


def _validation_detail(exc: RequestValidationError) -> list[dict[str, str]]:
    detail = []
    for err in exc.errors()[:_MAX_DETAIL]:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            detail.append({"field": "body", "message": f"invalid JSON: {ctx.get('error', err.get('msg'))}"})
            continue
        message = _short(str(err.get("msg", "invalid")), 200)
        detail.append({"field": _field(err.get("loc", ())), "message": message})
    return detail


def install_error_handlers(app: FastAPI) -> None:
    async def on_din_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DinError)
        if http_status(exc) >= 500 and not isinstance(exc, ServiceUnavailable):
            log.error("%s: %s", exc.code, exc.message)
        return din_error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        detail = _validation_detail(exc)
        fields = ", ".join(dict.fromkeys(d["field"] for d in detail))
        if (more := len(exc.errors()) - len(detail)) > 0:
            fields += f" (and {more} more errors)"
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
