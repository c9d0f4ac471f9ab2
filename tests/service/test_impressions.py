"""The impression log against real redis-server processes: every /rank answer carries an impression id
(body and header); with DIN_LOG_IMPRESSIONS the stream record is exactly what was answered (scores,
positions, version, the history the model saw), sampled by the id, trimmed, dropped and counted (never
failing /rank) when its buffer is full or Redis is gone, and written again once Redis is back; /events
records feedback naming an impression with the event. With the log off nothing is written. Records
carry the arm that served them (old records without one still decode), and a shadow version's scores
go through the same buffer and writer into the impression stream, marked `type` shadow."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from redis.cluster import RedisCluster

from contracts.records import SHADOW_RECORD, Candidate, Feedback, Impression, ShadowScores
from service.impressions import (
    STOP_FLUSH_S,
    WRITER_TIMEOUT_S,
    Answered,
    ImpressionLog,
    ShadowAnswered,
    new_impression_id,
    sampled,
)
from service.metrics import Metrics
from service.ports import free_port
from service.store.client import RedisConfig, async_client
from service.store.embedded import EmbeddedRedis
from service.store.history import HistoryStore
from service.store.keys import feedback_key, impressions_key, log_shard, log_slot
from service.store.streams import REDIS_DOWN, REDIS_ERROR, UNCONFIRMED, WRITTEN, StreamWriter
from tests.redis_cluster import cluster_url as cluster_url  # fixtures
from tests.redis_cluster import redis_cluster as redis_cluster
from tests.service.conftest import (
    MAX_HISTORY,
    BundleInfo,
    FaultProxy,
    LiveServer,
    make_settings,
    metric_value,
    run,
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


def test_records_round_trip_with_and_without_arms_and_old_records_decode() -> None:
    imp = Impression(new_impression_id(), 1.5, "u", "v1", ["h"], ["c"], [Candidate("a", None, 0.25, 0)], None)
    assert (imp.arm, imp.arm_forced) == (None, False)
    armed = dataclasses.replace(imp, arm="treatment", arm_forced=True)
    for rec in (imp, armed):
        assert Impression.from_dict(orjson.loads(orjson.dumps(rec))) == rec
        assert Impression.from_dict(rec.to_dict()) == rec
    old = imp.to_dict()
    del old["arm"], old["arm_forced"]  # logged before the arms issue
    assert Impression.from_dict(old) == imp
    shadow = ShadowScores(imp.impression_id, 1.5, "u", "v2", ["a", "b"], [0.5, 0.25], [3, 0])
    data = orjson.loads(orjson.dumps(shadow.to_dict()))
    assert data["type"] == SHADOW_RECORD and ShadowScores.from_dict(data) == shadow
    with pytest.raises(ValueError):
        ShadowScores.from_dict({**data, "type": "other"})
    with pytest.raises(ValueError):
        ShadowScores.from_dict({**data, "positions": [0]})
    with pytest.raises((KeyError, TypeError)):  # a shadow record is never taken for an impression
        Impression.from_dict(data)


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
    settings = make_settings(  # a 10 s deadline: this test is about the streams, not shedding
        bundle.path,
        cluster_url,
        redis_cluster=True,
        log_impressions=True,
        log_streams=3,
        request_timeout_ms=10_000,
    )
    with LiveServer(settings) as server, server.client() as c:
        server.wait_ready()
        bodies = [{"user_id": f"u{k}", "candidates": CANDIDATES[:4]} for k in range(60)]
        answers = [c.post("/rank", json=body) for body in bodies]
        assert [(r.status_code, r.text) for r in answers if r.status_code != 200] == []
        ids = [r.json()["impression_id"] for r in answers]
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


# ------------------------------------------------------------------ the writer thread


def _answers(bundle: BundleInfo, n: int, *, scorer: bool = True, seed: int = 0) -> list[Answered]:
    """`n` answers as /rank hands them to the log: all the bundle's items as candidates, a history of
    its items, scored by a real model (its categories: by the ids, or by the indices the batcher hands
    over) or by none."""
    import random

    import numpy as np

    from service.inference import RankResult
    from service.live import load_ranker
    from service.ranker import Scored

    ranker = load_ranker(make_settings(bundle.path, None))
    rng = random.Random(seed)
    out = []
    for k in range(n):
        candidates = [*rng.sample(bundle.items, len(bundle.items)), "not-an-item"]
        history = tuple(rng.sample(bundle.items, min(MAX_HISTORY, len(bundle.items))))
        scores = np.array([rng.random() for _ in candidates], dtype=np.float32)
        order = np.argsort(-scores)[: 1 + k % len(candidates)]  # top_k: 1, 2, ... candidates
        degraded = "history_unreadable" if k % 7 == 3 else None
        seen = () if degraded else history
        result = RankResult(
            scores,
            len(history),
            degraded,
            ranker.model_version,
            None,
            seen,
            ranker if scorer else None,
            # every other one as the batcher hands it over: with the indices the graph scored
            Scored(scores, ranker.encode(candidates), ranker.encode(list(seen))) if k % 2 else None,
        )
        out.append(Answered(new_impression_id(), time.time(), f"u{k}", candidates, order, result))
    return out


def _log(bundle: BundleInfo, url: str | None, store: Any = None, **kw: Any) -> tuple[ImpressionLog, Metrics]:
    metrics = Metrics()
    return ImpressionLog(
        store, make_settings(bundle.path, url, log_impressions=True, **kw), metrics, url=url
    ), metrics


def _counter(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client import generate_latest

    return metric_value(generate_latest(metrics.registry).decode(), name, labels)


@pytest.mark.parametrize("log_candidates", [0, 3])
def test_the_record_is_encoded_to_exactly_the_json_of_the_records_dataclass(
    bundle: BundleInfo, log_candidates: int
) -> None:
    """The writer encodes from plain lists (fast); the bytes are those of the record's `to_dict()`."""
    log, _ = _log(bundle, None, log_candidates=log_candidates)
    answers = _answers(bundle, 12) + _answers(bundle, 3, scorer=False, seed=1)
    answers += [dataclasses.replace(a, arm=f"arm{k}", arm_forced=k == 1) for k, a in enumerate(answers[:3])]
    for a in answers:
        encoded = log.encode(a)
        assert encoded == orjson.dumps(log.record(a).to_dict())
        assert Impression.from_dict(orjson.loads(encoded)) == log.record(a)
    assert any(c.category is not None for c in log.record(answers[0]).candidates)
    assert [(log.record(a).arm, log.record(a).arm_forced) for a in answers[-3:]] == [
        ("arm0", False),
        ("arm1", True),
        ("arm2", False),
    ]


def _shadows(answers: list[Answered], version: str = "shadow-v2", seed: int = 0) -> list[ShadowAnswered]:
    """A shadow version's scores of each answer's request: other scores, the same candidates."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [
        ShadowAnswered(
            a.impression_id,
            a.ts,
            a.user_id,
            version,
            a.candidates,
            rng.random(len(a.candidates)).astype(np.float32),
            a.order,
        )
        for a in answers
    ]


@pytest.mark.parametrize("log_candidates", [0, 3])
def test_a_shadow_record_scores_the_items_the_impression_logs(
    bundle: BundleInfo, log_candidates: int
) -> None:
    """The same items as the served record, in its order, with the shadow's scores and its rank of each
    among all the request's candidates; encoded to exactly the JSON of `ShadowScores.to_dict()`."""
    import numpy as np

    log, _ = _log(bundle, None, log_candidates=log_candidates)
    answers = _answers(bundle, 10)
    for a, s in zip(answers, _shadows(answers), strict=True):
        rec, served = log.shadow_record(s), log.record(a)
        assert log.encode_shadow(s) == orjson.dumps(rec.to_dict())
        assert ShadowScores.from_dict(orjson.loads(log.encode_shadow(s))) == rec
        assert rec.items == [c.item_id for c in served.candidates]
        assert (rec.impression_id, rec.user_id, rec.ts, rec.model_version) == (
            a.impression_id,
            a.user_id,
            a.ts,
            "shadow-v2",
        )
        shadow_order = np.argsort(-s.scores, kind="stable").tolist()
        for item, score, position in zip(rec.items, rec.scores, rec.positions, strict=True):
            i = s.candidates.index(item)
            assert score == float(s.scores[i]) and position == shadow_order.index(i)


def test_the_writer_encodes_and_writes_off_the_event_loop(bundle: BundleInfo, redis_url: str) -> None:
    """Every record is built, encoded and sent by the writer's own thread (its own Redis client): the
    event loop only appends to the buffer. stop() writes what is buffered."""
    answers = _answers(bundle, 40)

    async def go() -> tuple[set[str], str]:
        client = async_client(redis_url, RedisConfig(url=redis_url))
        store = HistoryStore(client)
        log, metrics = _log(bundle, redis_url, store)
        threads: set[str] = set()
        encode = log.encode

        def spying(a: Answered) -> bytes:
            threads.add(threading.current_thread().name)
            return encode(a)

        log.encode = spying  # type: ignore[method-assign]
        log.start()
        for a in answers[:20]:
            log.offer(a)
            await asyncio.sleep(0.001)
        for a in answers[20:]:  # at once: stop() must still write them
            log.offer(a)
        await log.stop()
        assert _counter(metrics, "din_impressions_logged_total") == 40
        assert _counter(metrics, "din_impressions_buffered") == 0
        await store.aclose()
        await client.aclose()
        return threads, threading.current_thread().name

    threads, loop_thread = run(go())
    assert threads == {"impression-log"} and loop_thread not in threads
    logged = _records(redis_url)
    assert [rec["impression_id"] for rec in logged] == [a.impression_id for a in answers]


def test_the_writer_writes_shadow_records_beside_their_impressions(
    bundle: BundleInfo, redis_url: str
) -> None:
    """Shadows share the buffer, the sampling (by the served impression's id) and the writer; each goes
    to its impression's stream, marked as a shadow record, counted with the impressions."""
    answers = _answers(bundle, 30)
    shadows = _shadows(answers)

    async def go() -> Metrics:
        client = async_client(redis_url, RedisConfig(url=redis_url))
        store = HistoryStore(client)
        log, metrics = _log(bundle, redis_url, store, log_sample_rate=0.5)
        log.start()
        for a, s in zip(answers, shadows, strict=True):
            log.offer(a)
            log.offer_shadow(s)
        await log.stop()
        await store.aclose()
        await client.aclose()
        return metrics

    metrics = run(go())
    want = [a.impression_id for a in answers if sampled(a.impression_id, 0.5)]
    assert 0 < len(want) < 30
    logged = _records(redis_url)
    assert _counter(metrics, "din_impressions_logged_total") == 2 * len(want) == len(logged)
    assert [r["impression_id"] for r in logged if "type" not in r] == want
    got = [ShadowScores.from_dict(r) for r in logged if r.get("type") == SHADOW_RECORD]
    assert [g.impression_id for g in got] == want and {g.model_version for g in got} == {"shadow-v2"}
    log, _ = _log(bundle, None)
    assert got == [log.shadow_record(s) for s in shadows if s.impression_id in want]


def test_a_full_buffer_drops_shadows_as_it_drops_impressions(bundle: BundleInfo) -> None:
    log, metrics = _log(bundle, None, log_buffer=2)
    answers = _answers(bundle, 2)
    for a, s in zip(answers, _shadows(answers), strict=True):
        log.offer(a)
        log.offer_shadow(s)  # never raises, never blocks
    assert _counter(metrics, "din_impressions_dropped_total", {"reason": "buffer_full"}) == 2


def test_stop_is_bounded_when_redis_does_not_answer(bundle: BundleInfo, redis_url: str) -> None:
    """Redis holds the writer's pipeline: stop() returns within STOP_FLUSH_S (and a little), the batch
    on its way counted `unconfirmed`, the rest `shutdown`; the writer, once its send ends, counts
    nothing twice."""
    answers = _answers(bundle, 10)

    async def go(proxy: FaultProxy) -> tuple[Metrics, threading.Thread]:
        client = async_client(proxy.url, RedisConfig(url=proxy.url))
        store = HistoryStore(client)
        log, metrics = _log(bundle, proxy.url, store, redis_timeout_ms=10_000)
        log.start()
        thread = log._thread
        assert thread is not None
        proxy.hold(FaultProxy.TO_SERVER)
        log.offer(answers[0])
        deadline = time.monotonic() + 5
        while log._in_flight == 0:  # the first batch is on its way
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        for a in answers[1:]:
            log.offer(a)
        t0 = time.monotonic()
        await log.stop()
        assert time.monotonic() - t0 < STOP_FLUSH_S + 1.0
        await client.aclose()
        return metrics, thread

    with FaultProxy(redis_url) as proxy:
        metrics, thread = run(go(proxy))
        dropped = {
            why: _counter(metrics, "din_impressions_dropped_total", {"reason": why})
            for why in ("unconfirmed", "shutdown", "redis_down", "buffer_full")
        }
        assert dropped == {"unconfirmed": 1, "shutdown": 9, "redis_down": 0, "buffer_full": 0}
        proxy.release(FaultProxy.TO_SERVER)
        thread.join(15)
        assert not thread.is_alive()
    assert _counter(metrics, "din_impressions_logged_total") == 0  # counted once, as unconfirmed
    assert _counter(metrics, "din_impressions_dropped_total", {"reason": "unconfirmed"}) == 1


def test_the_stream_writer_on_a_single_redis(redis_url: str) -> None:
    """Its own blocking client: written, an error reply per entry, nothing sent while the breaker is
    open, a Redis that is not there found down (and reported), never raising."""
    cfg = RedisConfig(url=redis_url, timeout_s=5.0)
    r = _redis(redis_url)
    r.set("din:log:not-a-stream", "x")
    calls: list[str] = []
    writer = StreamWriter(redis_url, cfg, failed=calls.append, succeeded=lambda: calls.append("ok"))
    try:
        entries = [(IMP, b'{"n": 1}'), ("din:log:not-a-stream", b"{}"), (IMP, b'{"n": 2}')]
        assert writer.append(entries, 100) == [WRITTEN, REDIS_ERROR, WRITTEN]
        assert [f["record"] for _, f in r.xrange(IMP)] == ['{"n": 1}', '{"n": 2}']
        assert calls == ["ok"] and writer.append([], 100) == []
    finally:
        writer.close()
    shut = StreamWriter(redis_url, cfg, down=lambda: True, failed=calls.append)
    assert shut.append([(IMP, b"{}")], 100) == [REDIS_DOWN] and r.xlen(IMP) == 2  # nothing sent
    r.close()
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    gone = StreamWriter(nowhere, RedisConfig(url=nowhere, connect_timeout_s=1.0), failed=calls.append)
    try:
        assert gone.append([(IMP, b"{}")] * 3, 100) == [REDIS_DOWN] * 3
        assert len(calls) == 2 and "Connection" in calls[1]
    finally:
        gone.close()


def test_a_slow_reply_drops_the_batch_unconfirmed_and_leaves_the_breaker_alone(
    bundle: BundleInfo, redis_url: str
) -> None:
    """A pipeline Redis is slow to answer (held past the writer's timeout) is `unconfirmed`, and the
    store's breaker, which guards the history reads, is not told: slow logging never degrades /rank.
    The log's writer gets a timeout of its own, never below WRITER_TIMEOUT_S."""
    calls: list[str] = []
    with FaultProxy(redis_url) as proxy:
        cfg = RedisConfig(url=proxy.url, timeout_s=0.3)
        writer = StreamWriter(proxy.url, cfg, failed=calls.append, succeeded=lambda: calls.append("ok"))
        try:
            assert writer.append([(IMP, b"{}")], 100) == [WRITTEN]
            proxy.hold(FaultProxy.TO_CLIENT)
            assert writer.append([(IMP, b"{}")] * 2, 100) == [UNCONFIRMED] * 2
            assert calls == ["ok"]  # failed() never called
        finally:
            proxy.release(FaultProxy.TO_CLIENT)
            writer.close()
    log, _ = _log(bundle, redis_url, None, redis_timeout_ms=100)
    assert log.redis_cfg.timeout_s == WRITER_TIMEOUT_S and log.redis_cfg.url == redis_url


@pytest.mark.slow
def test_the_stream_writer_on_a_cluster_writes_each_stream_on_its_master(cluster_url: str) -> None:
    cfg = RedisConfig(url=cluster_url, cluster=True, timeout_s=5.0)
    keys = [impressions_key("din:", k, 3) for k in range(3)]
    cluster = RedisCluster.from_url(cluster_url, decode_responses=True)
    cluster.set("{s0}not-a-stream", "x")
    writer = StreamWriter(cluster_url, cfg)
    try:
        entries = [(keys[n % 3], f'{{"n": {n}}}'.encode()) for n in range(12)]
        entries.append(("{s0}not-a-stream", b"{}"))
        assert writer.append(entries, 100) == [WRITTEN] * 12 + [REDIS_ERROR]
        for k, key in enumerate(keys):
            got = [orjson.loads(f["record"])["n"] for _, f in cluster.xrange(key)]
            assert got == [n for n in range(12) if n % 3 == k]
        assert len({cluster.get_node_from_key(key).name for key in keys}) == 3
    finally:
        writer.close()
        cluster.close()
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    gone = StreamWriter(nowhere, RedisConfig(url=nowhere, cluster=True, connect_timeout_s=1.0))
    assert gone.append([(keys[0], b"{}")], 100) == [REDIS_DOWN]
    gone.close()
