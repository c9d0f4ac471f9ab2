"""The HTTP API, one module per resource: rank, events, ops, admin, docs, ui (the ranking explorer).
`deps` holds the app's state and the typed dependencies. A new endpoint goes into the module of its
resource (or a new one, included here)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api import admin, docs, events, ops, rank, ui
from service.api.deps import api_key_guard
from service.schemas import ErrorBody
from service.security import ApiKeys


def api_router(keys: ApiKeys, *, metrics_auth: bool = False) -> APIRouter:
    """Every route of the service. With API keys configured, every
    route needs one (`deps.api_key_guard`) except those included in the open part below."""
    guard = api_key_guard(keys)
    # documented where it can happen: on the routes behind the keys, when keys are set
    unauthorized: dict[int | str, dict[str, Any]] = (
        {401: {"model": ErrorBody, "description": "no API key, or not a valid one"}} if guard else {}
    )
    api = APIRouter()

    # Open: liveness and readiness probes (orchestrators hold no key); /metrics unless metrics_auth.
    api.include_router(ops.probes)
    # Open: the ranking explorer's page and files (no data: what it reads is behind the keys below).
    api.include_router(ui.page)
    api.include_router(
        ops.metrics_router,
        dependencies=guard if metrics_auth else [],
        responses=unauthorized if metrics_auth else {},
    )

    # Behind the keys: everything else. A new router goes here.
    protected = APIRouter(dependencies=guard, responses=unauthorized)
    protected.include_router(rank.router)
    protected.include_router(events.router)
    protected.include_router(ops.router)
    protected.include_router(admin.router)
    protected.include_router(docs.router)
    protected.include_router(ui.router)
    api.include_router(protected)
    return api
