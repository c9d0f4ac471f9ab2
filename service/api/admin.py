"""Administration: POST /admin/reload, a hot reload of the model (`LiveModel.reload`)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from service.api.deps import LiveDep, StateDep
from service.schemas import ERROR_RESPONSES, ErrorBody, JSONResponse, ReloadRequest, ReloadResponse

router = APIRouter(tags=["admin"])


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses={
        **ERROR_RESPONSES,
        409: {"model": ErrorBody, "description": "another reload is running"},
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
