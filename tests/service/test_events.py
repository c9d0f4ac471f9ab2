"""POST /events over real HTTP against a real redis-server: all or nothing per call, idempotent by
event_id, honest 503s (nothing written vs outcome unknown) that never show Redis internals."""

from __future__ import annotations

import time

import httpx
import redis

from tests.service.conftest import BundleInfo, GatedProxy, LiveServer, make_settings, metric_value

# What a client must never see: Redis commands, keys, error names or texts.
INTERNALS = (
    "WRONGTYPE",
    "din:",
    "hist:",
    "evt:",
    "EVAL",
    "LPUSH",
    "LTRIM",
    "Error",
    "Timeout reading",
    "script",
)


def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)


def _assert_no_internals(resp: httpx.Response) -> None:
    for word in INTERNALS:
        assert word not in resp.text, f"{word!r} leaked: {resp.text}"


def _post(c: httpx.Client, events: list[dict[str, object]]) -> httpx.Response:
    return c.post("/events", json={"events": events})


def test_a_wrong_typed_key_answers_503_and_writes_nothing_for_anyone(
    live: LiveServer, redis_url: str
) -> None:
    r = _redis(redis_url)
    try:
        r.rpush("din:hist:keep", "i5")
        r.set("din:hist:broken", "a string, not a list")
        events = [
            {"user_id": "fresh", "item_id": "i2", "event_id": "ev-1"},
            {"user_id": "broken", "item_id": "i3"},
            {"user_id": "keep", "item_id": "i4", "event_id": "ev-2"},
        ]
        with live.client() as c:
            resp = _post(c, events)
            assert resp.status_code == 503, resp.text
            body = resp.json()
            assert body["error"] == "store_unavailable"
            assert "nothing was written" in body["message"]
            assert body["request_id"]
            _assert_no_internals(resp)
            # nothing for ANY user, and no event id remembered (a retry will write them)
            assert r.exists("din:hist:fresh") == 0
            assert r.lrange("din:hist:keep", 0, -1) == ["i5"]
            assert r.get("din:hist:broken") == "a string, not a list"
            assert r.keys("din:evt:*") == []
            text = c.get("/metrics").text
            assert metric_value(text, "din_events_failures_total", {"reason": "store_unavailable"}) == 1
            assert metric_value(text, "din_events_written_total") == 0

            r.delete("din:hist:broken")  # repaired: the same call now writes everything
            assert _post(c, events).json() == {"written": 3, "duplicates": 0}
            assert r.lrange("din:hist:keep", 0, -1) == ["i4", "i5"]
    finally:
        r.close()


def test_retried_event_ids_are_written_once(live: LiveServer, bundle: BundleInfo, redis_url: str) -> None:
    events = [
        {"user_id": "ivy", "item_id": "i7", "ts": 1, "event_id": "c-1"},
        {"user_id": "ivy", "item_id": "i8", "ts": 2, "event_id": "c-2"},
    ]
    r = _redis(redis_url)
    with live.client() as c:
        assert _post(c, events).json() == {"written": 2, "duplicates": 0}
        assert _post(c, events).json() == {"written": 0, "duplicates": 2}
        more = [*events, {"user_id": "ivy", "item_id": "i9", "ts": 3, "event_id": "c-3"}]
        assert _post(c, more).json() == {"written": 1, "duplicates": 2}
        assert r.lrange("din:hist:ivy", 0, -1) == ["i9", "i8", "i7"]
        # remembered for DIN_EVENTS_DEDUP_TTL_S (default a day)
        assert 86000 < r.ttl("din:evt:c-1") <= 86400
        body = c.post("/rank", json={"user_id": "ivy", "candidates": ["i2", "i3"]}).json()
        assert body["history_length"] == 3
        text = c.get("/metrics").text
        assert metric_value(text, "din_events_written_total") == 3
        assert metric_value(text, "din_events_duplicates_total") == 4
    r.close()


def test_duplicates_inside_one_call_and_events_without_ids(live: LiveServer, redis_url: str) -> None:
    events = [
        {"user_id": "jo", "item_id": "i2", "ts": 1, "event_id": "x"},
        {"user_id": "jo", "item_id": "i2", "ts": 1, "event_id": "x"},
        {"user_id": "jo", "item_id": "i3", "ts": 2},
        {"user_id": "jo", "item_id": "i3", "ts": 2},
    ]
    r = _redis(redis_url)
    with live.client() as c:
        assert _post(c, events).json() == {"written": 3, "duplicates": 1}
        assert r.lrange("din:hist:jo", 0, -1) == ["i3", "i3", "i2"]
    r.close()


def test_the_dedup_window_is_the_setting(bundle: BundleInfo, redis_url: str) -> None:
    with LiveServer(make_settings(bundle.path, redis_url, events_dedup_ttl_s=120)) as server:
        server.wait_ready()
        with server.client() as c:
            assert _post(c, [{"user_id": "u", "item_id": "i2", "event_id": "w"}]).status_code == 200
    r = _redis(redis_url)
    assert 0 < r.ttl("din:evt:w") <= 120
    r.close()


def test_bad_event_ids_answer_422_naming_the_field(live: LiveServer) -> None:
    with live.client() as c:
        for bad in ("", "x" * 257, 5, ["a"]):
            resp = _post(
                c, [{"user_id": "u", "item_id": "i2"}, {"user_id": "u", "item_id": "i2", "event_id": bad}]
            )
            assert resp.status_code == 422, (bad, resp.text)
            assert "events[1].event_id" in resp.json()["message"]
        # null is no id at all
        assert _post(c, [{"user_id": "u", "item_id": "i2", "event_id": None}]).status_code == 200


def test_openapi_documents_event_ids_duplicates_and_both_503s(live: LiveServer) -> None:
    with live.client() as c:
        spec = c.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "event_id" in schemas["Event"]["properties"]
    assert set(schemas["EventsResponse"]["required"]) == {"written", "duplicates"}
    op = spec["paths"]["/events"]["post"]
    assert "store_timeout" in op["responses"]["503"]["description"]
    assert "store_unavailable" in op["responses"]["503"]["description"]
    assert "event_id" in op["description"]


def test_an_unconfirmed_write_says_the_outcome_is_unknown_and_a_retry_is_safe(
    bundle: BundleInfo, redis_url: str
) -> None:
    r = _redis(redis_url)
    with GatedProxy(redis_url) as proxy:
        settings = make_settings(bundle.path, proxy.url, redis_timeout_ms=300)
        with LiveServer(settings) as server, server.client() as c:
            server.wait_ready()
            # loads the script, so the held call below is the write itself
            assert _post(c, [{"user_id": "warm", "item_id": "i2", "event_id": "w0"}]).status_code == 200
            events = [
                {"user_id": "kim", "item_id": "i4", "ts": 1, "event_id": "k-1"},
                {"user_id": "kim", "item_id": "i5", "ts": 2, "event_id": "k-2"},
                {"user_id": "lou", "item_id": "i6", "event_id": "k-3"},
            ]
            proxy.hold()  # the write reaches Redis only after the service stopped waiting for it
            resp = _post(c, events)
            assert resp.status_code == 503, resp.text
            body = resp.json()
            assert body["error"] == "store_timeout"
            assert "nothing was written" not in body["message"]  # not known, so not claimed
            assert "same event_ids" in body["message"]
            _assert_no_internals(resp)
            proxy.release()
            deadline = time.monotonic() + 5
            while r.llen("din:hist:lou") == 0:  # the late write lands
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # Retried as a client does: until Redis answers again (the service's breaker closes on
            # its first answered probe) a retry is refused with nothing written, then it lands once.
            while (retry := _post(c, events)).status_code == 503:
                assert retry.json()["error"] == "store_unavailable", retry.text
                assert "nothing was written" in retry.json()["message"], retry.text
                assert time.monotonic() < deadline + 5
                time.sleep(0.05)
            assert retry.json() == {"written": 0, "duplicates": 3}
            assert r.lrange("din:hist:kim", 0, -1) == ["i5", "i4"]
            assert r.lrange("din:hist:lou", 0, -1) == ["i6"]
            text = c.get("/metrics").text
            assert metric_value(text, "din_events_failures_total", {"reason": "store_timeout"}) == 1
    r.close()
