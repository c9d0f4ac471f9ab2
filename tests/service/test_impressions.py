"""The impression log against real redis-server processes: every /rank answer carries an impression id
(body and header); with DIN_LOG_IMPRESSIONS the stream record is exactly what was answered (scores,
positions, version, the history the model saw), sampled by the id, trimmed, dropped and counted (never
failing /rank) when its buffer is full or Redis is gone, and written again once Redis is back; /events
records feedback naming an impression with the event. With the log off nothing is written."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from redis.cluster import RedisCluster

from contracts.records import Feedback, Impression
from service.impressions import new_impression_id, sampled
from service.store.embedded import EmbeddedRedis
from service.store.keys import feedback_key, impressions_key, log_shard, log_slot
from tests.redis_cluster import cluster_url as cluster_url  # fixtures
from tests.redis_cluster import redis_cluster as redis_cluster
from tests.service.conftest import (
    MAX_HISTORY,
    BundleInfo,
    FaultProxy,
    LiveServer,
    make_settings,
    metric_value,
    seed_histories,
)
from tests.service.test_faults import CANDIDATES, Load, assert_only_200_or_overloaded, serving

ID = re.compile(r"^[0-9a-f]{32}$")
IMP, FB = "din:log:imp", "din:log:fb"


def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)


def _records(url: str, key: str = IMP) -> list[dict[str, Any]]:
    r = _redis(url)
    try:
        return [orjson.loads(fields["record"]) for _, fields in r.xrange(key)]
    finally:
        r.close()


def _wait(what: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _metrics(c: httpx.Client) -> str:
    return c.get("/metrics").text


def _logging(bundle: BundleInfo, url: str, **kw: Any) -> LiveServer:
    return LiveServer(make_settings(bundle.path, url, log_impressions=True, **kw))


def _categories(bundle: BundleInfo) -> dict[str, str]:
    lines = (bundle.path / "item_categories.txt").read_text().splitlines()
    return dict(zip(bundle.items, lines, strict=True))


# ------------------------------------------------------------------ the id


def test_ids_are_time_ordered_and_unique() -> None:
    ids = [new_impression_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids) and all(ID.match(i) for i in ids)
    assert new_impression_id(now_ms=1) < new_impression_id(now_ms=2) < new_impression_id(now_ms=2**47)
    assert [i[:12] for i in ids] == sorted(i[:12] for i in ids)  # the time part never goes back


def test_sampling_is_decided_by_the_id() -> None:
    ids = [new_impression_id() for _ in range(20_000)]
    assert all(sampled(i, 1.0) for i in ids) and not any(sampled(i, 0.0) for i in ids)
    share = sum(sampled(i, 0.25) for i in ids) / len(ids)
    assert 0.23 < share < 0.27
    assert all(sampled(i, 0.25) == sampled(i, 0.25) for i in ids[:100])


def test_log_streams_spread_evenly_over_the_slots_with_feedback_beside_its_impressions() -> None:
    from redis.crc import key_slot

    for shards in (2, 3, 8):
        slots = [key_slot(impressions_key("din:", k, shards).encode()) for k in range(shards)]
        assert slots == [log_slot(k, shards) for k in range(shards)]
        assert all(k * 16384 // shards <= s < (k + 1) * 16384 // shards for k, s in enumerate(slots))
        for k in range(shards):
            assert key_slot(feedback_key("din:", k, shards).encode()) == slots[k]
    assert impressions_key("din:") == IMP and feedback_key("din:") == FB
    picked = {log_shard(new_impression_id(), 3) for _ in range(200)}
    assert picked == {0, 1, 2}


# ------------------------------------------------------------------ answers


def test_every_answer_carries_its_id_and_with_the_log_off_nothing_is_written(
    live: LiveServer, redis_url: str
) -> None:
    seed_histories(redis_url, {"u1": ["i5", "i6"]})
    ids = []
    with live.client() as c:
        for k in range(60):
            resp = c.post("/rank", json={"user_id": f"u{k % 3}", "candidates": CANDIDATES})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert (
                ID.match(body["impression_id"]) and resp.headers["X-Impression-Id"] == body["impression_id"]
            )
            ids.append(body["impression_id"])
        event = {"user_id": "u1", "item_id": "i7", "impression_id": ids[0], "event_id": "e1"}
        resp = c.post("/events", json={"events": [event]})
        assert resp.json() == {"written": 1, "duplicates": 0}  # as it always was
        assert "din_impressions_logged_total 0.0" in _metrics(c)
    assert len(set(ids)) == len(ids)
    r = _redis(redis_url)
    try:
        assert r.keys("din:log*") == []
        assert r.lrange("din:hist:u1", 0, -1) == ["i7", "i5", "i6"]
    finally:
        r.close()


def test_the_logged_record_is_what_was_answered(bundle: BundleInfo, redis_url: str) -> None:
    history = [f"i{k}" for k in range(100, 100 + MAX_HISTORY + 5)]  # longer than T: the model sees 20
    seed_histories(redis_url, {"alice": history})
    cats = _categories(bundle)
    candidates = [*CANDIDATES, CANDIDATES[0], "not-an-item"]  # a duplicate, an unknown item
    with _logging(bundle, redis_url) as server, server.client() as c:
        server.wait_ready()
        resp = c.post("/rank", json={"user_id": "alice", "candidates": candidates, "top_k": 5})
        answer = resp.json()
        _wait(lambda: len(_records(redis_url)) == 1)
        assert metric_value(_metrics(c), "din_impressions_logged_total") == 1
    rec = Impression.from_dict(_records(redis_url)[0])
    assert rec.impression_id == answer["impression_id"] == resp.headers["X-Impression-Id"]
    assert rec.user_id == "alice" and rec.model_version == answer["model_version"] == "test-v1"
    assert rec.degraded is None and abs(rec.ts - time.time()) < 60
    assert rec.history == history[:MAX_HISTORY] and len(rec.history) == answer["history_length"]
    assert rec.history_categories == [cats[i] for i in history[:MAX_HISTORY]]
    # every returned item, with its score and its place in the answer (by default: all returned)
    assert len(rec.candidates) == 5
    by_place = sorted(rec.candidates, key=lambda cand: cand.position or 0)
    assert [(cand.item_id, cand.score) for cand in by_place] == [
        (i["item_id"], i["score"]) for i in answer["items"]
    ]
    assert [cand.position for cand in by_place] == list(range(5))
    for cand in rec.candidates:
        assert cand.category == cats.get(cand.item_id)
    request_order = list(dict.fromkeys(candidates))
    logged = [request_order.index(cand.item_id) for cand in rec.candidates]
    assert logged == sorted(logged)  # in the request's order


def test_fewer_candidates_per_record_keeps_the_best(bundle: BundleInfo, redis_url: str) -> None:
    with _logging(bundle, redis_url, log_candidates=3) as server, server.client() as c:
        server.wait_ready()
        answer = c.post("/rank", json={"user_id": "bob", "candidates": CANDIDATES}).json()
        _wait(lambda: len(_records(redis_url)) == 1)
    rec = Impression.from_dict(_records(redis_url)[0])
    best = {i["item_id"]: (place, i["score"]) for place, i in enumerate(answer["items"][:3])}
    assert {cand.item_id: (cand.position, cand.score) for cand in rec.candidates} == best
    assert rec.history == [] and rec.degraded is None  # bob has no history: not degraded


def test_a_degraded_answer_is_logged_with_an_empty_history(bundle: BundleInfo, redis_url: str) -> None:
    r = _redis(redis_url)
    r.set("din:hist:broken", "not a list")
    r.close()
    with _logging(bundle, redis_url) as server, server.client() as c:
        server.wait_ready()
        answer = c.post("/rank", json={"user_id": "broken", "candidates": CANDIDATES}).json()
        assert answer["degraded"] is True
        _wait(lambda: len(_records(redis_url)) == 1)
    rec = Impression.from_dict(_records(redis_url)[0])
    assert rec.degraded == "history_unreadable" and rec.history == [] and rec.history_categories == []
    assert rec.impression_id == answer["impression_id"]


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_the_sample_rate_is_honoured(bundle: BundleInfo, redis_url: str, rate: float) -> None:
    with _logging(bundle, redis_url, log_sample_rate=rate) as server, server.client() as c:
        server.wait_ready()
        ids = [
            c.post("/rank", json={"user_id": "u", "candidates": CANDIDATES[:3]}).json()["impression_id"]
            for _ in range(40)
        ]
        want = {i for i in ids if sampled(i, rate)}
        _wait(lambda: metric_value(_metrics(c), "din_impressions_logged_total") == len(want))
    assert {rec["impression_id"] for rec in _records(redis_url)} == want
    assert len(want) == {0.0: 0, 1.0: 40}.get(rate, len(want))
    if rate == 0.0:
        assert _redis(redis_url).keys("din:log*") == []


def test_trimming_keeps_the_stream_bounded(bundle: BundleInfo, redis_url: str) -> None:
    r = _redis(redis_url)
    r.config_set("stream-node-max-entries", 10)  # approximate trimming drops whole nodes of 10
    try:
        with _logging(bundle, redis_url, log_maxlen=50) as server, server.client() as c:
            server.wait_ready()
            for _ in range(300):
                assert c.post("/rank", json={"user_id": "u", "candidates": CANDIDATES[:2]}).status_code == 200
            _wait(lambda: metric_value(_metrics(c), "din_impressions_logged_total") == 300)
        assert 50 <= r.xlen(IMP) <= 60
        assert r.memory_usage(IMP) < 200_000
    finally:
        r.config_set("stream-node-max-entries", 100)
        r.close()


def test_a_full_buffer_drops_and_counts_without_failing_rank(bundle: BundleInfo, redis_url: str) -> None:
    """Redis holds the writer's pipeline (no answer), the buffer of 3 fills: every /rank is still 200
    (explicit histories: no Redis read), the overflow is dropped and counted, the rest written after."""
    with FaultProxy(redis_url) as proxy:
        settings = dict(log_buffer=3, redis_timeout_ms=10_000)
        with _logging(bundle, proxy.url, **settings) as server, server.client() as c:
            server.wait_ready()
            proxy.hold(FaultProxy.TO_SERVER)
            for _ in range(20):
                resp = c.post("/rank", json={"user_id": "u", "candidates": CANDIDATES, "history": ["i3"]})
                assert resp.status_code == 200, resp.text
            text = _metrics(c)
            full = metric_value(text, "din_impressions_dropped_total", {"reason": "buffer_full"})
            assert full >= 14, text
            assert metric_value(text, "din_impressions_buffered") <= 3
            proxy.release(FaultProxy.TO_SERVER)
            _wait(lambda: metric_value(_metrics(c), "din_impressions_logged_total") == 20 - full)
    assert len(_records(redis_url)) == 20 - full


@pytest.mark.slow
def test_redis_killed_under_load_rank_stays_up_drops_are_counted_and_logging_resumes(
    bundle: BundleInfo, tmp_path: Path
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=0, unix_socket=False).start()
    try:
        port = server.port
        args = ("--log-impressions", "--request-timeout-ms", "1000", "--redis-timeout-ms", "500")
        with serving(bundle, server.url, *args) as (proc, url, out):
            with Load(url, ["a", "b", "c"]) as load:
                time.sleep(1.0)
                assert server.pid is not None
                os.kill(server.pid, signal.SIGKILL)
                server.stop(timeout=5)
                time.sleep(2.0)
                server = EmbeddedRedis(tmp_path / "redis", port=port, unix_socket=False).start()
                restarted = time.time()
                time.sleep(3.0)
            assert proc.poll() is None, out.tail()
            assert_only_200_or_overloaded(load.answers, out)
            assert any(a.body.get("degraded") for a in load.answers if a.status == 200)
            with httpx.Client(base_url=url, timeout=10) as c:
                text = c.get("/metrics").text
            lost = sum(
                metric_value(text, "din_impressions_dropped_total", {"reason": why})
                for why in ("redis_down", "redis_error", "unconfirmed")
            )
            assert lost > 0, text
            logged = metric_value(text, "din_impressions_logged_total")
            answered = sum(1 for a in load.answers if a.status == 200)
            assert logged + lost <= answered
        after = [rec for rec in _records(server.url) if rec["ts"] > restarted + 1.0]
        assert len(after) >= 5, "logging did not resume after the restart"
    finally:
        server.stop(timeout=5)


# ------------------------------------------------------------------ feedback


def test_feedback_is_recorded_with_its_event(bundle: BundleInfo, redis_url: str) -> None:
    seed_histories(redis_url, {"carol": ["i5"]})
    with _logging(bundle, redis_url) as server, server.client() as c:
        server.wait_ready()
        imp = c.post("/rank", json={"user_id": "carol", "candidates": CANDIDATES}).json()["impression_id"]
        clicked = c.post("/rank", json={"user_id": "carol", "candidates": CANDIDATES}).json()
        event = {
            "user_id": "carol",
            "item_id": "i41",
            "ts": 17.5,
            "event_id": "click-1",
            "impression_id": imp,
        }
        assert c.post("/events", json={"events": [event]}).json() == {
            "written": 1,
            "duplicates": 0,
            "feedback": 1,
        }
        # a retry is a duplicate: no second click
        assert c.post("/events", json={"events": [event]}).json() == {
            "written": 0,
            "duplicates": 1,
            "feedback": 0,
        }
        # an impression never answered (or expired) is kept: the export counts it as an orphan
        orphan = {"user_id": "carol", "item_id": "i42", "impression_id": new_impression_id()}
        plain = {"user_id": "carol", "item_id": "i43"}
        resp = c.post("/events", json={"events": [orphan, plain]})
        assert resp.json() == {"written": 2, "duplicates": 0, "feedback": 1}
        assert metric_value(_metrics(c), "din_feedback_logged_total") == 2
        assert clicked["impression_id"] != imp
    r = _redis(redis_url)
    try:
        assert r.lrange("din:hist:carol", 0, -1) == ["i43", "i42", "i41", "i5"]
    finally:
        r.close()
    fbs = [Feedback.from_dict(rec) for rec in _records(redis_url, FB)]
    assert [(f.impression_id, f.user_id, f.item_id, f.event_id, f.event_ts) for f in fbs] == [
        (imp, "carol", "i41", "click-1", 17.5),
        (orphan["impression_id"], "carol", "i42", None, None),
    ]
    assert all(abs(f.ts - time.time()) < 60 for f in fbs)


def test_a_malformed_impression_id_is_a_422_naming_the_field(live: LiveServer, redis_url: str) -> None:
    with live.client() as c:
        for bad in ("nope", "ABCDEF" + "0" * 26, "0" * 31, 12345):
            events = [
                {"user_id": "u", "item_id": "i2"},
                {"user_id": "u", "item_id": "i3", "impression_id": bad},
            ]
            resp = c.post("/events", json={"events": events})
            assert resp.status_code == 422, resp.text
            body = resp.json()
            assert body["error"] == "validation_error"
            assert [d["field"] for d in body["detail"]] == ["events[1].impression_id"], body
    assert _redis(redis_url).keys("*") == []  # nothing written


def test_a_failing_feedback_stream_fails_the_event_and_writes_nothing(
    bundle: BundleInfo, redis_url: str
) -> None:
    """A single Redis writes the event and its feedback in one script: both or neither."""
    r = _redis(redis_url)
    r.set(FB, "not a stream")
    try:
        with _logging(bundle, redis_url) as server, server.client() as c:
            server.wait_ready()
            event = {"user_id": "dave", "item_id": "i9", "impression_id": new_impression_id()}
            resp = c.post("/events", json={"events": [event]})
            assert resp.status_code == 503 and resp.json()["error"] == "store_unavailable", resp.text
            assert "din:" not in resp.text
        assert r.exists("din:hist:dave") == 0
    finally:
        r.close()


# ------------------------------------------------------------------ Redis Cluster


@pytest.mark.slow
def test_on_a_cluster_the_log_is_spread_over_streams_on_different_masters(
    bundle: BundleInfo, cluster_url: str
) -> None:
    settings = make_settings(
        bundle.path, cluster_url, redis_cluster=True, log_impressions=True, log_streams=3
    )
    with LiveServer(settings) as server, server.client() as c:
        server.wait_ready()
        ids = [
            c.post("/rank", json={"user_id": f"u{k}", "candidates": CANDIDATES[:4]}).json()["impression_id"]
            for k in range(60)
        ]
        _wait(lambda: metric_value(_metrics(c), "din_impressions_logged_total") == 60)
        event = {"user_id": "u1", "item_id": "i7", "event_id": "e1", "impression_id": ids[1]}
        assert c.post("/events", json={"events": [event]}).json() == {
            "written": 1,
            "duplicates": 0,
            "feedback": 1,
        }
    cluster = RedisCluster.from_url(cluster_url, decode_responses=True)
    try:
        keys = [impressions_key("din:", k, 3) for k in range(3)]
        masters = {cluster.get_node_from_key(key).name for key in keys}
        assert len(masters) == 3
        seen: dict[str, str] = {}
        for key in keys:
            entries = cluster.xrange(key)
            assert entries, f"nothing in {key}"
            for _, fields in entries:
                seen[orjson.loads(fields["record"])["impression_id"]] = key
        assert seen == {i: impressions_key("din:", log_shard(i, 3), 3) for i in ids}
        fb_key = feedback_key("din:", log_shard(ids[1], 3), 3)
        [(_, fields)] = cluster.xrange(fb_key)
        assert orjson.loads(fields["record"])["impression_id"] == ids[1]
        assert cluster.lrange("din:hist:u1", 0, -1) == ["i7"]
    finally:
        cluster.close()
