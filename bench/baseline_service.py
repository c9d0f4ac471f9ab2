"""BASELINE, for comparison only: the seed-style ranking service a team following the DIN article
would ship. `make bench` measures din-rank against it; nothing in din-rank uses it.

FastAPI + PyTorch eager on the same trained checkpoint (`din train`'s run directory), the history read
from Redis the same way (one LRANGE on the same key), and the model in its training form: the target
embeddings [B, E] tiled against the history [B, T, E] (`DIN.forward`, the [q, k, q-k, q*k] input
built per candidate). One request at a time: the handler runs the model on the event loop, as the
seed does. Same request and response shapes as `POST /rank`.

    python bench/baseline_service.py --run RUN_DIR --redis-url redis://127.0.0.1:6379/0 --port 8001
"""

from __future__ import annotations

import argparse
import sys

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from model.checkpoint import load_run
from service.store.client import RedisConfig, sync_client
from service.store.keys import DEFAULT_PREFIX, history_key


class RankRequest(BaseModel):
    user_id: str
    candidates: list[str]
    top_k: int | None = None


def create_baseline(run_dir: str, redis_url: str, prefix: str = DEFAULT_PREFIX) -> FastAPI:
    model, ckpt = load_run(run_dir)
    vocab = ckpt.vocab
    T = ckpt.max_history
    redis = sync_client(redis_url, RedisConfig(timeout_s=1.0))
    app = FastAPI(title="din-rank baseline (seed-style, PyTorch eager, tiled)")

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready", "model_version": "baseline"}

    @app.post("/rank")
    async def rank(req: RankRequest) -> dict[str, object]:
        history = [str(i) for i in redis.lrange(history_key(prefix, req.user_id), 0, T - 1)]  # newest first
        n = len(req.candidates)
        target = torch.from_numpy(vocab.lookup(req.candidates))  # (B,)
        hist = torch.from_numpy(vocab.lookup(history)).reshape(1, -1)  # (1, L)
        if hist.shape[1] == 0:
            hist = torch.zeros((1, 1), dtype=torch.int64)
        hist = hist.expand(n, -1)  # (B, L): the history tiled once per candidate
        hist_len = torch.full((n,), len(history), dtype=torch.int64)
        with torch.no_grad():
            ctr = torch.sigmoid(model(target, hist, hist_len)).tolist()  # the paper's tiled form
        order = sorted(range(n), key=lambda i: -ctr[i])[: req.top_k or n]
        return {
            "user_id": req.user_id,
            "model_version": "baseline",
            "items": [{"item_id": req.candidates[i], "score": ctr[i]} for i in order],
            "history_length": len(history),
            "degraded": False,
        }

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="din train's run directory (checkpoint.pt)")
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--prefix", default=DEFAULT_PREFIX)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    app = create_baseline(args.run, args.redis_url, args.prefix)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
