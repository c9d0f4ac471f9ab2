"""The API's documentation: /openapi.json, /docs (Swagger UI), /redoc. Routes of the API rather than
FastAPI's built-ins (`create_app` turns those off), so that with API keys set they are behind the keys
like every other route: the schema names every endpoint and its limits."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from service.schemas import JSONResponse

router = APIRouter(include_in_schema=False)


def _schema_url(request: Request) -> str:
    return str(request.scope.get("root_path", "")) + "/openapi.json"


@router.get("/openapi.json")
async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=_schema_url(request), title=f"{request.app.title} - Swagger UI")


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=_schema_url(request), title=f"{request.app.title} - ReDoc")
