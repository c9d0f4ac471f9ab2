"""The ranking explorer: `GET /ui`, a page of plain HTML, CSS, JavaScript and SVG (service/ui/, no build
step, nothing loaded from elsewhere) that ranks with `POST /rank` and `explain`, and draws what each
behaviour did to each score (and, as a second view, the attention weights) as a heatmap; and the two
read-only endpoints it starts from (`/ui/suggestions`, `/ui/items`).

The page and its files hold no data and are open (a browser cannot send an API key to load a page);
everything they read goes through the API behind the keys: with keys set, the page asks for one and
sends `Authorization: Bearer <key>` with every request."""

from __future__ import annotations

import functools
import random
from importlib import resources

from fastapi import APIRouter, Query
from fastapi.responses import Response

from contracts.errors import NotFound
from contracts.vocab import FIRST_ID
from service.api.deps import LiveDep, StateDep
from service.ranker import Ranker
from service.schemas import (
    ERROR_RESPONSES,
    ItemsRequest,
    ItemsResponse,
    JSONResponse,
    Suggestions,
)
from service.store.sample import sample_users

# name -> media type: the only files served (a name outside this table is a 404, never a path)
FILES = {
    "index.html": "text/html; charset=utf-8",
    "explorer.css": "text/css; charset=utf-8",
    "explorer.js": "text/javascript; charset=utf-8",
}
MAX_SAMPLE_USERS = 50
MAX_SAMPLE_ITEMS = 200

page = APIRouter(include_in_schema=False)  # open: static files, no data


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("service").joinpath("ui", name).read_bytes()


def _file(name: str) -> Response:
    if name not in FILES:
        raise NotFound(f"no file {name[:64]!r} in the explorer")
    # no-cache: a page of a new release is never mixed with the scripts of an old one
    return Response(_read(name), media_type=FILES[name], headers={"Cache-Control": "no-cache"})


@page.get("/ui")
async def explorer() -> Response:
    return _file("index.html")


@page.get("/ui/static/{name}")
async def explorer_file(name: str) -> Response:
    return _file(name)


def _describe(ranker: Ranker, ids: list[str]) -> list[dict[str, object]]:
    cats = ranker.bundle.item_categories
    out: list[dict[str, object]] = []
    for item, index in zip(ids, ranker.encode(ids).tolist(), strict=True):
        known = index >= FIRST_ID
        out.append({"item_id": item, "known": known, "category": cats[index] if known and cats else None})
    return out


router = APIRouter(tags=["explorer"], responses=ERROR_RESPONSES)


@router.get(
    "/ui/suggestions",
    response_model=Suggestions,
    summary="Where the ranking explorer starts",
    description="A few users with a history in Redis, a random sample of the served model's "
    "catalogue (with categories), and this service's limits. Read-only.",
)
async def suggestions(
    state: StateDep,
    live: LiveDep,
    users: int = Query(8, ge=0, le=MAX_SAMPLE_USERS, description="users to suggest"),
    items: int = Query(20, ge=0, le=MAX_SAMPLE_ITEMS, description="catalogue items to sample"),
) -> Response:
    ranker = live.current
    known = len(ranker.vocab) - FIRST_ID
    picks = random.sample(range(FIRST_ID, len(ranker.vocab)), min(items, known))
    found = await sample_users(state.store, users) if state.store is not None and users else []
    body = {
        "model_version": ranker.model_version,
        "can_explain": ranker.can_explain,
        "max_history": ranker.max_history,
        "max_candidates": state.settings.max_candidates,
        "max_explain_top": state.settings.max_explain_top,
        "max_explain_items": state.settings.max_explain_items,
        "users": found,
        "items": _describe(ranker, [ranker.vocab.ids[i] for i in picks]),
    }
    return JSONResponse(body)


@router.post(
    "/ui/items",
    response_model=ItemsResponse,
    summary="Look items up in the served model's catalogue",
    description="For each id: whether the model knows it, and its category (read-only).",
)
async def items(req: ItemsRequest, live: LiveDep) -> Response:
    return JSONResponse({"items": _describe(live.current, req.item_ids)})
