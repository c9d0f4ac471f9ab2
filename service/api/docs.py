"""The API's documentation: /openapi.json, /docs (Swagger UI), /redoc. Routes of the API rather than
FastAPI's built-ins (`create_app` turns those off), so that with API keys set they are behind the keys
like every other route: the schema names every endpoint and its limits.

Offline: FastAPI's pages load Swagger UI and ReDoc from a CDN, so on a machine without internet access
/docs would be blank. Their files come from the `fastapi-offline` package (Swagger UI 5 and ReDoc 2,
MIT and Apache-2.0) and are served here, under /docs/assets/. ReDoc's bundle names one remote file of its
own, the Redocly logo of its sidebar footer: served with an empty inline image in its place, so that no
page here asks anything of another host."""

from __future__ import annotations

import functools
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from contracts.errors import NotFound
from service.schemas import JSONResponse

router = APIRouter(include_in_schema=False)

ASSETS = Path(fastapi_offline.__file__).parent / "static"
# name -> media type: the only files served (any other name is a 404, never a path)
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
_REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
_EMPTY_SVG = b"data:image/svg+xml,%3Csvg xmlns=%27http://www.w3.org/2000/svg%27/%3E"


@functools.cache
def _redoc_js() -> bytes:
    return (ASSETS / "redoc.standalone.js").read_bytes().replace(_REDOC_LOGO, _EMPTY_SVG)


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", ""))


@router.get("/openapi.json")
async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=root + "/openapi.json",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/assets/favicon.png",
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_redoc_html(
        openapi_url=root + "/openapi.json",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}/docs/assets/redoc.standalone.js",
        redoc_favicon_url=f"{root}/docs/assets/favicon.png",
        with_google_fonts=False,
    )


@router.get("/docs/assets/{name}")
async def asset(name: str) -> Response:
    if name not in ASSET_TYPES:
        raise NotFound(f"no documentation asset {name[:64]!r}")
    if name == "redoc.standalone.js":
        return Response(_redoc_js(), media_type=ASSET_TYPES[name], headers={"Cache-Control": "max-age=86400"})
    return FileResponse(
        ASSETS / name, media_type=ASSET_TYPES[name], headers={"Cache-Control": "max-age=86400"}
    )
