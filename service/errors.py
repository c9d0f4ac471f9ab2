"""Where errors become HTTP responses, in one place. The tree itself is `model.errors`.

Every error answers the same JSON body: {"error": code, "message": text, "request_id": id, ...}.
A `DinError` answers its own status and code; a request that fails validation answers 422 naming
each bad field; routing errors (404, 405) keep their status. Anything else is the middleware's
JSON 500 (`service.middleware`), never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import DinError, ServiceUnavailable
from service.log import request_id
from service.schemas import JSONResponse

log = logging.getLogger(__name__)


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
        if exc.status >= 500 and not isinstance(exc, ServiceUnavailable):
            log.error("%s: %s", exc.code, exc.message)
        return error_response(exc.status, exc.body(), exc.headers)

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
