"""The HTTP floor, for comparison only: din-rank's HTTP stack (uvicorn, FastAPI, the same request
models with the same limits, the same orjson response) answering POST /rank with a constant score
for every candidate, no Redis and no model. What remains of a din-rank request beyond this floor
is the model, Redis and the batcher.

    python bench/floor_service.py --port 8002
"""

from __future__ import annotations

import argparse
import sys

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response

from service.config import Settings
from service.schemas import JSONResponse, Limits, RankRequest, RequestLimits


def create_floor(settings: Settings) -> FastAPI:
    app = FastAPI(title="din-rank HTTP floor (constant scores)")
    app.add_middleware(RequestLimits, limits=Limits.of(settings))

    @app.get("/readyz")
    async def readyz() -> Response:
        return JSONResponse({"status": "ready", "model_version": "floor"})

    @app.post("/rank")
    async def rank(req: RankRequest) -> Response:
        candidates = list(dict.fromkeys(req.candidates))[: req.top_k or None]
        return JSONResponse(
            {
                "user_id": req.user_id,
                "model_version": "floor",
                "items": [{"item_id": c, "score": 0.5} for c in candidates],
                "history_length": 0,
                "degraded": False,
            }
        )

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8002)
    args = ap.parse_args(argv)
    app = create_floor(Settings(_env_file=None))  # type: ignore[call-arg]
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
