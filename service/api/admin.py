"""Administration: POST /admin/reload, a hot reload of this replica's model (`LiveModel.reload`); the
versions live at once and their routing for the whole fleet (`service.routing`): GET /admin/models,
GET|PUT|DELETE /admin/routing, POST /admin/routing/promote and /admin/routing/rollback. Every change
is one call, validated and loaded on this replica before it is written, atomic in Redis."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from contracts.errors import RoutingError
from contracts.routing import Arm, Document, Shadow, build, promoted
from service.api.deps import LiveDep, RouterDep, StateDep, refuse_reload_under_routing
from service.schemas import (
    ERROR_RESPONSES,
    ErrorBody,
    JSONResponse,
    PromoteRequest,
    ReloadRequest,
    ReloadResponse,
    RollbackRequest,
    RoutingRequest,
)

router = APIRouter(tags=["admin"])


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses={
        **ERROR_RESPONSES,
        409: {
            "model": ErrorBody,
            "description": "another reload is running, or a routing of several versions is in force "
            "(routing_conflict: change versions through /admin/routing)",
        },
        422: {
            "model": ErrorBody,
            "description": "invalid request (`detail` names each bad field), or bundle_rejected: the "
            "bundle was refused (named reason) and the old model keeps serving",
        },
    },
    summary="Hot-reload the model",
    description="Loads, verifies and warms the bundle beside the live model, then switches atomically. "
    "Requests keep being served throughout; batches already running finish on the model they started "
    "with. On any failure the old model keeps serving and the answer names it.",
)
async def reload(state: StateDep, live: LiveDep, body: ReloadRequest | None = None) -> Response:
    refuse_reload_under_routing(state)
    bundle = Path(body.bundle) if body is not None and body.bundle else None
    done = await live.reload(state.settings, state.metrics, bundle)
    return JSONResponse(
        {
            "model_version": done.model_version,
            "previous_version": done.previous_version,
            "bundle": str(done.bundle),
            "seconds": round(done.seconds, 3),
        }
    )


_CHANGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    409: {"model": ErrorBody, "description": "routing_conflict: the routing changed meanwhile (`revision`)"},
    422: {
        "model": ErrorBody,
        "description": "invalid request, or invalid_routing: `detail` names the field (a version this "
        "replica cannot load, a bundle holding another version, more versions than DIN_MAX_MODELS)",
    },
    503: {"model": ErrorBody, "description": "Redis did not answer: nothing was changed"},
}


def _routing_answer(router: Any, doc: Document) -> Response:
    return JSONResponse({"revision": doc.revision, "routing": router.describe()["routing"]})


@router.get(
    "/admin/models",
    summary="Every version live here, the routing in force, traffic per arm",
    responses=ERROR_RESPONSES,
)
async def admin_models(router_: RouterDep) -> Response:
    """Per live version: its member, bundle, resident memory its load took, whether it explains, the
    arms it serves and its shadow sample rate; the routing in force (each arm's share of the users),
    the last routing this replica refused and why, and the answers it served per arm and version."""
    return JSONResponse(router_.describe())


@router.get(
    "/admin/routing",
    summary="The routing document in Redis (what every replica follows)",
    responses={**ERROR_RESPONSES, 503: _CHANGE_RESPONSES[503]},
)
async def get_routing(router_: RouterDep) -> Response:
    doc = await router_.read()
    if doc is None:
        return JSONResponse({"revision": 0, "current": None, "history": []})
    return JSONResponse(doc.to_dict())


@router.put(
    "/admin/routing",
    summary="Put a routing of model versions in force, for every replica",
    responses=_CHANGE_RESPONSES,
    description="Arms (a name, a version by bundle or model_version, a weight) and shadows (a version and "
    "a sample rate). Each version is loaded, verified and warmed on this replica first; the routing is "
    "written to Redis only if every one is, atomically (compare-and-set on its revision), then in force "
    "here at once and on every other replica within DIN_ROUTING_POLL_S. With the same salt a weight change "
    "moves only the users it must (from the arms that shrank to the arms that grew).",
)
async def put_routing(body: RoutingRequest, router_: RouterDep) -> Response:
    arms = []
    for i, a in enumerate(body.arms):
        version, bundle = await router_.version_of(a.bundle, a.model_version, f"arms[{i}]")
        arms.append(Arm(a.name, version, bundle, a.weight))
    shadows = []
    for i, sh in enumerate(body.shadows):
        version, bundle = await router_.version_of(sh.bundle, sh.model_version, f"shadows[{i}]")
        shadows.append(Shadow(version, bundle, sh.sample_rate))

    def make(doc: Document) -> Document:
        previous = doc.current
        salt = body.salt or (previous.salt if previous is not None else f"din-{secrets.token_hex(4)}")
        return doc.then(build(arms, shadows, salt, previous, body.note or "put"))

    return _routing_answer(router_, await router_.change(make, body.expected_revision))


@router.delete(
    "/admin/routing",
    summary="No routing: every replica's configured bundle serves everyone",
    responses=_CHANGE_RESPONSES,
)
async def clear_routing(router_: RouterDep, expected_revision: int | None = None) -> Response:
    return _routing_answer(router_, await router_.change(lambda doc: doc.then(None), expected_revision))


@router.post(
    "/admin/routing/promote",
    summary="One arm's version for everyone (the other arms dropped, shadows kept)",
    responses=_CHANGE_RESPONSES,
)
async def promote(body: PromoteRequest, router_: RouterDep) -> Response:
    def make(doc: Document) -> Document:
        if doc.current is None:
            raise RoutingError("no routing is in force: there is no arm to promote", "arm")
        return doc.then(promoted(doc.current, body.arm))

    return _routing_answer(router_, await router_.change(make, body.expected_revision))


@router.post(
    "/admin/routing/rollback",
    summary="Back to the routing before the current one",
    responses=_CHANGE_RESPONSES,
)
async def rollback(router_: RouterDep, body: RollbackRequest | None = None) -> Response:
    expected = body.expected_revision if body is not None else None
    return _routing_answer(router_, await router_.change(lambda doc: doc.rolled_back(), expected))
