"""The HTTP service end to end: real uvicorn, real redis-server, real ONNX Runtime, no mocks."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from service.store.embedded import EmbeddedRedis
from tests.service.conftest import BundleInfo, GatedProxy, LiveServer, make_settings, metric_value

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


def _seed(url: str, histories: dict[str, list[str]], prefix: str = "din:") -> None:
    """Histories newest first, written as din seed would (one list per user)."""
    r = redis.Redis.from_url(url)
    try:
        for user, hist in histories.items():
            r.delete(f"{prefix}hist:{user}")
            if hist:
                r.rpush(f"{prefix}hist:{user}", *hist)
    finally:
        r.close()


def _assert_matches_reference(
    bundle: BundleInfo, body: dict, candidates: list[str], history: list[str]
) -> None:
    ref = dict(zip(candidates, bundle.reference(candidates, history), strict=True))
    assert len(body["items"]) == len(ref)
    for item in body["items"]:
        assert abs(item["score"] - ref[item["item_id"]]) <= TOL, item
        assert 0.0 < item["score"] < 1.0
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)


@pytest.fixture(scope="module")
def shared(bundle: BundleInfo, redis_server: EmbeddedRedis) -> Iterator[LiveServer]:
    """One server for the tests that only read (validation, headers, docs): starting one per case is slow."""
    with LiveServer(make_settings(bundle.path, redis_server.url)) as server:
        server.wait_ready()
        yield server


# ------------------------------------------------------------------ scores


def test_scores_equal_pytorch_reference_for_seeded_users(
    live: LiveServer, bundle: BundleInfo, redis_url: str
) -> None:
    histories = {
        "alice": [f"i{k}" for k in range(10, 40)],  # longer than T = 20: the store keeps 20
        "bob": ["i5", "i7", "i9"],
        "carol": ["i100", "unknown-item", "i200"],  # an unknown id in the history
    }
    _seed(redis_url, histories)
    candidates = [f"i{k}" for k in range(2, 80)] + ["never-seen"]
    with live.client() as c:
        for user, hist in histories.items():
            resp = c.post("/rank", json={"user_id": user, "candidates": candidates})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["user_id"] == user and body["model_version"] == "test-v1"
            assert body["degraded"] is False
            assert body["history_length"] == min(len(hist), 20)
            _assert_matches_reference(bundle, body, candidates, hist[:20])


def test_cold_start_user(live: LiveServer, bundle: BundleInfo) -> None:
    candidates = ["i3", "i4", "i50"]
    with live.client() as c:
        body = c.post("/rank", json={"user_id": "nobody", "candidates": candidates}).json()
    assert body["history_length"] == 0 and body["degraded"] is False
    _assert_matches_reference(bundle, body, candidates, [])


def test_unknown_items_are_ranked_as_oov(live: LiveServer, bundle: BundleInfo) -> None:
    candidates = ["zzz-1", "i10", "zzz-2"]
    with live.client() as c:
        body = c.post(
            "/rank", json={"user_id": "u", "candidates": candidates, "history": ["i10", "i11"]}
        ).json()
    assert {i["item_id"] for i in body["items"]} == set(candidates)
    _assert_matches_reference(bundle, body, candidates, ["i10", "i11"])
    oov = [i["score"] for i in body["items"] if i["item_id"].startswith("zzz")]
    assert oov[0] == oov[1]  # both are the OOV index


def test_history_override_replaces_redis_and_is_truncated(
    live: LiveServer, bundle: BundleInfo, redis_url: str
) -> None:
    _seed(redis_url, {"dave": ["i2", "i3"]})
    history = [f"i{k}" for k in range(100, 130)]  # 30 > T: the newest 20 are used
    candidates = [f"i{k}" for k in range(40, 60)]
    with live.client() as c:
        body = c.post("/rank", json={"user_id": "dave", "candidates": candidates, "history": history}).json()
    assert body["history_length"] == 20
    _assert_matches_reference(bundle, body, candidates, history)
    with live.client() as c:  # an empty explicit history is a cold start, not a Redis read
        body = c.post("/rank", json={"user_id": "dave", "candidates": candidates, "history": []}).json()
    assert body["history_length"] == 0
    _assert_matches_reference(bundle, body, candidates, [])


def test_events_then_rank_sees_them(live: LiveServer, bundle: BundleInfo) -> None:
    candidates = [f"i{k}" for k in range(2, 30)]
    events = [
        {"user_id": "erin", "item_id": "i12", "ts": 30},
        {"user_id": "erin", "item_id": "i10", "ts": 10},
        {"user_id": "frank", "item_id": "i99"},
        {"user_id": "erin", "item_id": "i11", "ts": 20},
    ]
    with live.client() as c:
        resp = c.post("/events", json={"events": events})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"written": 4, "duplicates": 0}
        body = c.post("/rank", json={"user_id": "erin", "candidates": candidates}).json()
        assert body["history_length"] == 3
        _assert_matches_reference(bundle, body, candidates, ["i12", "i11", "i10"])  # newest ts first
        c.post("/events", json={"events": [{"user_id": "erin", "item_id": "i13"}]})
        body = c.post("/rank", json={"user_id": "erin", "candidates": candidates}).json()
        _assert_matches_reference(bundle, body, candidates, ["i13", "i12", "i11", "i10"])


def test_events_are_trimmed_to_max_history(live: LiveServer, bundle: BundleInfo, redis_url: str) -> None:
    events = [{"user_id": "gina", "item_id": f"i{k}", "ts": k} for k in range(2, 40)]
    with live.client() as c:
        assert c.post("/events", json={"events": events}).json() == {"written": 38, "duplicates": 0}
        body = c.post("/rank", json={"user_id": "gina", "candidates": ["i5"]}).json()
    assert body["history_length"] == 20
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert r.lrange("din:hist:gina", 0, -1) == [f"i{k}" for k in range(39, 19, -1)]
    finally:
        r.close()


def test_duplicates_and_top_k(live: LiveServer, bundle: BundleInfo) -> None:
    candidates = ["i20", "i21", "i20", "i22", "i21", "i23"]
    unique = ["i20", "i21", "i22", "i23"]
    with live.client() as c:
        body = c.post("/rank", json={"user_id": "u", "candidates": candidates, "history": ["i5"]}).json()
        assert [i["item_id"] for i in body["items"]].count("i20") == 1
        _assert_matches_reference(bundle, body, unique, ["i5"])
        top = c.post(
            "/rank", json={"user_id": "u", "candidates": candidates, "history": ["i5"], "top_k": 2}
        ).json()
    assert top["items"] == body["items"][:2]


def test_request_id_echoed_or_generated(shared: LiveServer) -> None:
    with shared.client() as c:
        resp = c.get("/healthz", headers={"X-Request-ID": "abc-123"})
        assert resp.headers["x-request-id"] == "abc-123"
        generated = c.get("/healthz").headers["x-request-id"]
        assert len(generated) == 32
        bad = c.post("/rank", json={}, headers={"X-Request-ID": "req-9"})
        assert bad.headers["x-request-id"] == "req-9" and bad.json()["request_id"] == "req-9"


def test_model_returns_manifest(shared: LiveServer, bundle: BundleInfo) -> None:
    with shared.client() as c:
        assert c.get("/model").json() == bundle.manifest


def test_openapi_documents_limits_and_examples(shared: LiveServer) -> None:
    with shared.client() as c:
        spec = c.get("/openapi.json").json()
    rank = spec["components"]["schemas"]["RankRequest"]
    assert rank["properties"]["candidates"]["maxItems"] == 1000
    assert rank["examples"]
    assert "/events" in spec["paths"] and "422" in spec["paths"]["/rank"]["post"]["responses"]


def test_metrics_series(live: LiveServer) -> None:
    with live.client() as c:
        c.post("/rank", json={"user_id": "u", "candidates": ["i2", "i3"]})
        c.post("/rank", json={"user_id": "u", "candidates": []})
        text = c.get("/metrics").text
    for name in (
        "din_requests_total",
        "din_request_latency_seconds_bucket",
        "din_redis_latency_seconds_bucket",
        "din_queue_wait_seconds_bucket",
        "din_inference_latency_seconds_bucket",
        "din_batch_requests_bucket",
        "din_batch_candidates_bucket",
        "din_candidates_scored_total",
        "din_degraded_responses_total",
        "din_queue_depth",
        "din_batch_failures_total",
        "din_queue_rejections_total",
        "din_model_info",
    ):
        assert name in text, name
    assert metric_value(text, "din_requests_total", {"route": "/rank", "status": "200"}) == 1
    assert metric_value(text, "din_requests_total", {"route": "/rank", "status": "422"}) == 1
    assert metric_value(text, "din_candidates_scored_total") >= 2
    assert 'model_version="test-v1"' in text
    # Every metric the README names is one the service exports (and /docs gets its own label).
    exported = set(re.findall(r"^# TYPE (\w+) ", text, flags=re.M))
    exported |= {f"{n}_total" for n in exported} | {f"{n}_info" for n in exported}
    named = set(re.findall(r"`(din_\w+)", (ROOT / "README.md").read_text()))
    assert named and named <= exported, sorted(named - exported)


def test_request_metrics_are_labelled_by_the_matched_route(shared: LiveServer) -> None:
    with shared.client() as c:
        assert c.get("/docs").status_code == 200
        assert c.get("/no/such/path").status_code == 404
        assert c.get("/rank").status_code == 405  # refused before a route is chosen: still its label
        text = c.get("/metrics").text
    # any declared route is its own label (no list to keep in step); unmatched paths share "other"
    assert metric_value(text, "din_requests_total", {"route": "/docs", "status": "200"}) >= 1
    assert metric_value(text, "din_requests_total", {"route": "other", "status": "404"}) >= 1
    assert metric_value(text, "din_requests_total", {"route": "/rank", "status": "405"}) >= 1
    assert 'route="/no/such/path"' not in text


# ------------------------------------------------------------------ validation: 422 naming the field

LONG = "x" * 257


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/rank", {"candidates": ["i2"]}, "user_id"),
        ("/rank", {"user_id": "", "candidates": ["i2"]}, "user_id"),
        ("/rank", {"user_id": 7, "candidates": ["i2"]}, "user_id"),
        ("/rank", {"user_id": "u"}, "candidates"),
        ("/rank", {"user_id": "u", "candidates": []}, "candidates"),
        ("/rank", {"user_id": "u", "candidates": ["i2"] * 1001}, "candidates"),
        ("/rank", {"user_id": "u", "candidates": ["i2", 3]}, "candidates[1]"),
        ("/rank", {"user_id": "u", "candidates": [None]}, "candidates[0]"),
        ("/rank", {"user_id": "u", "candidates": "i2"}, "candidates"),
        ("/rank", {"user_id": "u", "candidates": ["i2", LONG]}, "candidates[1]"),
        ("/rank", {"user_id": "u", "candidates": ["i2", ""]}, "candidates[1]"),
        ("/rank", {"user_id": LONG, "candidates": ["i2"]}, "user_id"),
        ("/rank", {"user_id": "u", "candidates": ["i2"], "top_k": 0}, "top_k"),
        ("/rank", {"user_id": "u", "candidates": ["i2"], "top_k": 1001}, "top_k"),
        ("/rank", {"user_id": "u", "candidates": ["i2"], "top_k": "3"}, "top_k"),
        ("/rank", {"user_id": "u", "candidates": ["i2"], "history": ["i3"] * 1001}, "history"),
        ("/rank", {"user_id": "u", "candidates": ["i2"], "history": [1]}, "history[0]"),
        ("/rank", {"user_id": "u", "candidates": ["i2"], "extra": 1}, "extra"),
        ("/rank", [], "body"),
        ("/events", {}, "events"),
        ("/events", {"events": []}, "events"),
        ("/events", {"events": [{"user_id": "u", "item_id": "i2"}] * 1001}, "events"),
        ("/events", {"events": [{"user_id": "u"}]}, "events[0].item_id"),
        ("/events", {"events": [{"user_id": "u", "item_id": 5}]}, "events[0].item_id"),
        ("/events", {"events": [{"user_id": "u", "item_id": LONG}]}, "events[0].item_id"),
        ("/events", {"events": [{"user_id": "u", "item_id": "i2", "ts": "soon"}]}, "events[0].ts"),
    ],
)
def test_bad_input_is_422_naming_the_field(
    shared: LiveServer, path: str, payload: object, field: str
) -> None:
    with shared.client() as c:
        resp = c.post(path, json=payload)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error"] == "validation_error"
    assert field in [d["field"] for d in body["detail"]], body
    assert all(set(d) == {"field", "message"} and d["message"] for d in body["detail"])
    assert "Traceback" not in resp.text


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"user_id": "u", "candidates": [', {"content-type": "application/json"}),
        (b"not json", {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (b"\xff\xfe", {"content-type": "application/json"}),
    ],
)
def test_malformed_json_is_422(shared: LiveServer, content: bytes, headers: dict[str, str]) -> None:
    with shared.client() as c:
        resp = c.post("/rank", content=content, headers=headers)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == "validation_error"
    assert resp.json()["detail"][0]["field"] == "body"


def test_unknown_route_and_method_are_json(shared: LiveServer) -> None:
    with shared.client() as c:
        assert c.get("/nope").json()["error"] == "not_found"
        resp = c.get("/rank")
    assert resp.status_code == 405 and resp.json()["error"] == "method_not_allowed"


# ------------------------------------------------------------------ readiness


def test_not_ready_until_warmed_up(bundle: BundleInfo, redis_url: str) -> None:
    gate = threading.Event()
    with LiveServer(make_settings(bundle.path, redis_url), warmup_gate=gate) as server, server.client() as c:
        assert c.get("/healthz").status_code == 200
        for _ in range(3):
            resp = c.get("/readyz")
            assert resp.status_code == 503
            assert resp.json()["reason"] == "warming_up"
        assert metric_value(c.get("/metrics").text, "din_ready") == 0
        gate.set()
        server.wait_ready()
        assert c.get("/readyz").json()["model_version"] == "test-v1"
        assert metric_value(c.get("/metrics").text, "din_ready") == 1


# ------------------------------------------------------------------ Redis outage


def test_redis_outage_degrades_rank_and_refuses_events(bundle: BundleInfo, tmp_path) -> None:
    redis_srv = EmbeddedRedis(tmp_path / "redis", port=0, unix_socket=False).start()
    try:
        settings = make_settings(
            bundle.path, redis_srv.url, redis_timeout_ms=300, redis_connect_timeout_ms=300
        )
        with LiveServer(settings) as server, server.client() as c:
            server.wait_ready()
            _seed(redis_srv.url, {"hank": ["i4", "i5"]})
            body = c.post("/rank", json={"user_id": "hank", "candidates": ["i2", "i3"]}).json()
            assert body["history_length"] == 2 and body["degraded"] is False
            ready = c.get("/readyz").json()
            assert ready["redis"] == "up" and ready["degraded"] is False
            assert metric_value(c.get("/metrics").text, "din_redis_up") == 1

            redis_srv.stop()  # a real outage: the server goes away under an open pool

            resp = c.post("/rank", json={"user_id": "hank", "candidates": ["i2", "i3"], "top_k": 1})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["degraded"] is True and body["history_length"] == 0 and len(body["items"]) == 1
            cold = dict(zip(["i2", "i3"], bundle.reference(["i2", "i3"], []), strict=True))
            best = max(cold, key=lambda k: cold[k])
            assert body["items"][0]["item_id"] == best
            assert abs(body["items"][0]["score"] - cold[best]) <= TOL  # scored as a cold start

            # an explicit history does not need Redis: not degraded
            ok = c.post("/rank", json={"user_id": "hank", "candidates": ["i2"], "history": ["i4"]}).json()
            assert ok["degraded"] is False and ok["history_length"] == 1

            resp = c.post("/events", json={"events": [{"user_id": "hank", "item_id": "i9"}]})
            assert resp.status_code == 503
            assert resp.json()["error"] == "store_unavailable"
            assert "nothing was written" in resp.json()["message"]

            # still ready: this replica answers (degraded), so a balancer must keep it; Redis reported
            resp = c.get("/readyz")
            assert resp.status_code == 200, resp.text
            assert resp.json()["redis"] == "down" and resp.json()["degraded"] is True
            assert c.get("/healthz").status_code == 200
            text = c.get("/metrics").text
            assert metric_value(text, "din_degraded_responses_total", {"reason": "redis_unavailable"}) >= 1
            assert metric_value(text, "din_redis_up") == 0 and metric_value(text, "din_ready") == 1
    finally:
        redis_srv.stop()


# ------------------------------------------------------------------ batching and load shedding


def _wait_metric(c: httpx.Client, name: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while metric_value(c.get("/metrics").text, name) < value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not reach {value}")
        time.sleep(0.01)


def _wait_batcher(c: httpx.Client, admitted: int, depth: int, timeout: float = 10.0) -> None:
    """Wait until `admitted` /rank requests entered the queue and exactly `depth` still wait in it."""
    deadline = time.monotonic() + timeout
    while True:
        text = c.get("/metrics").text
        if (
            metric_value(text, "din_queue_admitted_total") >= admitted
            and metric_value(text, "din_queue_depth") == depth
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"batcher did not reach admitted={admitted} depth={depth}:\n{text}")
        time.sleep(0.01)


def test_concurrent_requests_share_batches(bundle: BundleInfo, redis_url: str) -> None:
    n = 16
    candidates = [f"i{k}" for k in range(2, 12)]
    _seed(redis_url, {f"user{k}": [f"i{k + 2}"] for k in range(n)})
    proxy = GatedProxy(redis_url)
    # Redis is held on purpose: the budget must outlast the hold (deadlines are tested elsewhere)
    settings = make_settings(
        bundle.path,
        proxy.url,
        redis_timeout_ms=10_000,
        batch_max_delay_ms=1,
        request_timeout_ms=30_000,
        inference_workers=1,
        max_inflight_batches=1,  # one slot: what arrives while it is busy waits for the next batch
    )

    def rank(ac: httpx.AsyncClient, k: int) -> asyncio.Task[httpx.Response]:
        return asyncio.create_task(ac.post("/rank", json={"user_id": f"user{k}", "candidates": candidates}))

    with proxy, LiveServer(settings) as server, server.client() as c:
        server.wait_ready()
        proxy.hold()  # the first batch stalls on Redis, holding the only inference slot

        async def go() -> list[httpx.Response]:
            async with server.async_client() as ac:
                first = rank(ac, 0)
                await asyncio.to_thread(_wait_batcher, c, 1, 0)
                rest = [rank(ac, k) for k in range(1, n)]
                # while the slot is busy, every later request waits in the queue for the next batch
                await asyncio.to_thread(_wait_batcher, c, n, n - 1)
                proxy.release()
                return [await first, *[await t for t in rest]]

        responses = asyncio.run(go())
        text = c.get("/metrics").text
    assert all(r.status_code == 200 for r in responses)
    for k, r in enumerate(responses):
        _assert_matches_reference(bundle, r.json(), candidates, [f"i{k + 2}"])
    batches = metric_value(text, "din_batch_requests_count")
    assert batches == 2, f"{n} requests took {batches} ONNX Runtime calls"
    assert metric_value(text, "din_batch_requests_sum") == n


def test_full_queue_answers_503_with_retry_after_at_once(bundle: BundleInfo, redis_url: str) -> None:
    proxy = GatedProxy(redis_url)
    settings = make_settings(
        bundle.path,
        proxy.url,
        redis_timeout_ms=10_000,
        request_timeout_ms=30_000,  # Redis is held on purpose: the budget must outlast the hold
        queue_max=2,
        max_candidates=4,
        batch_max_candidates=4,  # one request per batch
        batch_max_delay_ms=0,
        inference_workers=1,
        max_inflight_batches=1,  # one batch computing, the queue behind it
    )
    body = {"user_id": "u", "candidates": ["i2", "i3", "i4", "i5"]}
    with proxy, LiveServer(settings) as server, server.client() as c:
        server.wait_ready()
        proxy.hold()

        async def go() -> tuple[list[httpx.Response], httpx.Response, float]:
            async with server.async_client() as ac:
                # 1st: computing (stuck on Redis); 2nd and 3rd: queued, the queue is full
                held = []
                for admitted, depth in ((1, 0), (2, 1), (3, 2)):
                    held.append(asyncio.create_task(ac.post("/rank", json=body)))
                    await asyncio.to_thread(_wait_batcher, c, admitted, depth)
                t0 = time.perf_counter()
                rejected = await ac.post("/rank", json=body)
                elapsed = time.perf_counter() - t0
                proxy.release()
                return [await t for t in held], rejected, elapsed

        held, rejected, elapsed = asyncio.run(go())
        assert rejected.status_code == 503
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json()["error"] == "overloaded"
        assert elapsed < 2.0  # refused at once, not after a timeout
        assert [r.status_code for r in held] == [200, 200, 200]
        text = c.get("/metrics").text
        assert metric_value(text, "din_queue_rejections_total", {"reason": "queue_full"}) == 1
