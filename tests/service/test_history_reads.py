"""History reads fail per user: a key that is not a list degrades that user's answer alone, the others
in the same micro-batch are scored from their histories (real redis-server, real ONNX Runtime)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis

from contracts.bundle import load_bundle
from service.batcher import Batcher
from service.live import ModelSet
from service.metrics import Metrics
from service.ranker import Ranker
from service.store.client import RedisConfig, async_client
from service.store.history import HistoryStore
from tests.service.conftest import BundleInfo, LiveServer, make_settings, metric_value

TOL = 1e-5
CANDIDATES = ["i2", "i3", "i4", "i5"]
HISTORIES = {"ann": ["i9", "i8", "i7"], "bob": ["i20", "i21"]}


def _seed(url: str) -> None:
    r = redis.Redis.from_url(url, socket_timeout=5)
    try:
        for user, hist in HISTORIES.items():
            r.rpush(f"din:hist:{user}", *hist)
        r.set("din:hist:cat", "a string, not a list")
    finally:
        r.close()


def test_one_unreadable_history_degrades_that_request_alone_in_one_batch(
    bundle: BundleInfo, redis_url: str
) -> None:
    _seed(redis_url)
    ranker = Ranker(load_bundle(bundle.path), providers=["CPUExecutionProvider"], intra_op_threads=1)

    async def go() -> None:
        client = async_client(redis_url, RedisConfig(connect_timeout_s=5, timeout_s=5, max_connections=8))
        # a long max_delay: the three requests below close one batch together
        batcher = Batcher(
            ModelSet.single(ranker),
            HistoryStore(client),
            Metrics(),
            max_delay_s=0.5,
            max_candidates=4096,
            queue_max=64,
        )
        batcher.start()
        try:
            ann, cat, bob = await asyncio.gather(
                *(batcher.submit(u, CANDIDATES, None) for u in ("ann", "cat", "bob"))
            )
            assert batcher.batches == 1
        finally:
            await batcher.stop()
            await client.aclose()
        assert cat.degraded == "history_unreadable" and cat.history_length == 0
        np.testing.assert_allclose(cat.scores, bundle.reference(CANDIDATES, []), atol=TOL, rtol=0)
        for got, user in ((ann, "ann"), (bob, "bob")):
            assert got.degraded is None and got.history_length == len(HISTORIES[user])
            np.testing.assert_allclose(
                got.scores, bundle.reference(CANDIDATES, HISTORIES[user]), atol=TOL, rtol=0
            )
        reg = batcher.metrics.registry
        assert reg.get_sample_value("din_degraded_responses_total", {"reason": "history_unreadable"}) == 1
        assert reg.get_sample_value("din_degraded_responses_total", {"reason": "redis_unavailable"}) is None

    asyncio.run(go())


@pytest.mark.parametrize("explicit", [False, True])
def test_over_http_only_the_unreadable_user_is_degraded(
    bundle: BundleInfo, redis_url: str, explicit: bool
) -> None:
    _seed(redis_url)
    settings = make_settings(bundle.path, redis_url, batch_max_delay_ms=200, request_timeout_ms=10000)

    async def go(server: LiveServer) -> dict[str, dict[str, object]]:
        async with server.async_client() as c:

            async def rank(user: str) -> dict[str, object]:
                body: dict[str, object] = {"user_id": user, "candidates": CANDIDATES}
                if explicit and user == "cat":  # an explicit history never reads the broken key
                    body["history"] = ["i30"]
                resp = await c.post("/rank", json=body)
                assert resp.status_code == 200, resp.text
                assert "WRONGTYPE" not in resp.text and "din:" not in resp.text
                return dict(resp.json())

            answers = await asyncio.gather(*(rank(u) for u in ("ann", "cat", "bob")))
        return dict(zip(("ann", "cat", "bob"), answers, strict=True))

    with LiveServer(settings) as server:
        server.wait_ready()
        got = asyncio.run(go(server))
        with server.client() as c:
            text = c.get("/metrics").text

    for user in ("ann", "bob"):
        body = got[user]
        assert body["degraded"] is False and body["history_length"] == len(HISTORIES[user])
        want = dict(zip(CANDIDATES, bundle.reference(CANDIDATES, HISTORIES[user]), strict=True))
        for item in body["items"]:  # type: ignore[attr-defined]
            assert abs(item["score"] - want[item["item_id"]]) <= TOL
    cat = got["cat"]
    cat_history = ["i30"] if explicit else []
    assert cat["degraded"] is (not explicit) and cat["history_length"] == len(cat_history)
    want = dict(zip(CANDIDATES, bundle.reference(CANDIDATES, cat_history), strict=True))
    for item in cat["items"]:  # type: ignore[attr-defined]
        assert abs(item["score"] - want[item["item_id"]]) <= TOL
    unreadable = metric_value(text, "din_degraded_responses_total", {"reason": "history_unreadable"})
    assert unreadable == (0 if explicit else 1)
    assert metric_value(text, "din_degraded_responses_total", {"reason": "redis_unavailable"}) == 0
