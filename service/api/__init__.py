"""The HTTP API, one module per resource: rank, events, ops, admin. `deps` holds the app's state and the
typed dependencies. A new endpoint goes into the module of its resource (or a new one, included here)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api import admin, events, ops, rank
from service.schemas import RequestModels


def api_router(models: RequestModels) -> APIRouter:
    """Every route of the service, with this app's request models."""
    api = APIRouter()
    api.include_router(rank.router(models))
    api.include_router(events.router(models))
    api.include_router(ops.router)
    api.include_router(admin.router)
    return api
