"""Several model versions in one service: arms by a hash of the user, one routing in Redis for every
replica, promotion and rollback, refusals that keep the routing in force, shadows on idle CPU.
Real redis-server, real ONNX Runtime sessions, real HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from contracts.routing import Document
from tests.service.conftest import (
    BundleInfo,
    FaultProxy,
    LiveServer,
    make_bundle,
    make_settings,
    metric_value,
)

CANDIDATES = ["i2", "i3", "i5", "i8", "i13", "i21"]


@pytest.fixture(scope="module")
def bundle_v3(bundle: BundleInfo, tmp_path_factory: pytest.TempPathFactory) -> BundleInfo:
    """v1's weights under another version (its graphs copied, no trace): a shadow that agrees with v1."""
    path = tmp_path_factory.mktemp("bundle-v3") / "bundle"
    return make_bundle(path, seed=7, version="test-v3", graphs_of=bundle)


def _rank(c: httpx.Client, user: str, arm: str | None = None) -> httpx.Response:
    headers = {"X-Din-Arm": arm} if arm is not None else {}
    return c.post("/rank", json={"user_id": user, "candidates": CANDIDATES}, headers=headers)


def _scores(body: dict[str, Any]) -> list[float]:
    by_item = {i["item_id"]: i["score"] for i in body["items"]}
    return [by_item[c] for c in CANDIDATES]


def _two_arms(v1: BundleInfo, v2: BundleInfo, w1: float = 0.5, w2: float = 0.5, **kw: Any) -> dict[str, Any]:
    return {
        "arms": [
            {"name": "control", "bundle": str(v1.path), "weight": w1},
            {"name": "treatment", "bundle": str(v2.path), "weight": w2},
        ],
        "salt": "exp-1",
        **kw,
    }


@pytest.fixture
def server(bundle: BundleInfo, redis_url: str) -> Iterator[LiveServer]:
    # a 10 s deadline: these tests are about routing, not shedding (a version loading beside a request
    # every 10 ms on a busy two-core CI box can push one past the default 250 ms: a 503 shed, not a fault)
    settings = make_settings(bundle.path, redis_url, routing_poll_s=0.2, request_timeout_ms=10_000)
    with LiveServer(settings) as s:
        s.wait_ready()
        yield s


def test_arms_serve_each_user_its_version_and_promote_and_rollback_are_one_call(
    server: LiveServer, bundle: BundleInfo, bundle_v2: BundleInfo
) -> None:
    by_version = {"test-v1": bundle, "test-v2": bundle_v2}
    users = [f"u{k}" for k in range(40)]
    with server.client() as c:
        plain = _rank(c, "u0").json()
        assert plain["arm"] is None and plain["routing_revision"] is None
        assert plain["model_version"] == "test-v1"

        r = c.put("/admin/routing", json=_two_arms(bundle, bundle_v2))
        assert r.status_code == 200, r.text
        revision = r.json()["revision"]
        doc = Document.from_dict(c.get("/admin/routing").json())
        assert doc.revision == revision and doc.current is not None
        routing = doc.current.compiled()

        seen = set()
        for user in users:
            r = _rank(c, user)
            body = r.json()
            arm = routing.arm_of(user)
            assert (body["arm"], body["model_version"], body["routing_revision"]) == (
                arm.name,
                arm.model_version,
                revision,
            )
            assert r.headers["X-Din-Arm"] == arm.name
            # scored by that version's own graph: the PyTorch reference of that model
            expected = by_version[arm.model_version].reference(CANDIDATES, [])
            assert _scores(body) == pytest.approx(expected, abs=1e-5)
            seen.add(arm.name)
        assert seen == {"control", "treatment"}

        # QA: an explicit arm by header, whatever the hash says; an unknown one is a 422 naming it
        forced = _rank(c, users[0], arm="treatment").json()
        assert (forced["arm"], forced["model_version"]) == ("treatment", "test-v2")
        bad = _rank(c, users[0], arm="nope")
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "X-Din-Arm"

        models = c.get("/admin/models").json()
        versions = {v["model_version"]: v for v in models["versions"]}
        assert set(versions) == {"test-v1", "test-v2"}
        assert versions["test-v2"]["arms"] == ["treatment"]
        # measured (the resident memory its load added: in a test process that has freed much memory
        # before, the load may reuse those pages, so 0 is a measurement too)
        assert versions["test-v2"]["memory_bytes"] is not None and versions["test-v2"]["memory_bytes"] >= 0
        assert versions["test-v1"]["memory_bytes"] is not None  # the configured bundle's, measured at start
        assert {a["name"]: a["share"] for a in models["routing"]["arms"]} == {
            "control": 0.5,
            "treatment": 0.5,
        }
        traffic = {(t["arm"], t["model_version"]): t["answers"] for t in models["traffic"]}
        assert sum(traffic.values()) == len(users) + 2  # the routed users, the QA request (and u0 before)
        text = c.get("/metrics").text
        assert (
            metric_value(text, "din_arm_requests_total", {"arm": "treatment", "model_version": "test-v2"}) > 0
        )
        assert metric_value(text, "din_routing_revision") == revision

        # a per-replica reload would change this replica alone: refused while a routing is in force
        reload = c.post("/admin/reload", json={"bundle": str(bundle_v2.path)})
        assert reload.status_code == 409 and reload.json()["error"] == "routing_conflict"

        r = c.post("/admin/routing/promote", json={"arm": "treatment"})
        assert r.status_code == 200, r.text
        answers = [_rank(c, u).json() for u in users[:10]]
        assert {(a["arm"], a["model_version"]) for a in answers} == {("treatment", "test-v2")}

        r = c.post("/admin/routing/rollback")
        assert r.status_code == 200, r.text
        back = Document.from_dict(c.get("/admin/routing").json()).current
        assert back is not None
        assert [_rank(c, u).json()["arm"] for u in users] == [routing.arm_of(u).name for u in users]

        r = c.delete("/admin/routing")
        assert r.status_code == 200 and r.json()["routing"] is None
        after = _rank(c, "u0").json()
        assert (after["arm"], after["model_version"]) == (None, "test-v1")
        assert c.post("/admin/reload").status_code == 200  # no routing: reloads are this replica's again
        # the version no routing names any more is unloaded
        assert [v["model_version"] for v in c.get("/admin/models").json()["versions"]] == ["test-v1"]


def test_routings_that_cannot_be_in_force_are_refused_and_the_old_one_stays(
    bundle: BundleInfo, bundle_v2: BundleInfo, bundle_v3: BundleInfo, redis_url: str, tmp_path: Path
) -> None:
    settings = make_settings(bundle.path, redis_url, routing_poll_s=0.2, max_models=2)
    with LiveServer(settings) as server, server.client() as c:
        server.wait_ready()
        ok = c.put("/admin/routing", json=_two_arms(bundle, bundle_v2))
        assert ok.status_code == 200
        revision = ok.json()["revision"]

        def refused(body: dict[str, Any]) -> dict[str, Any]:
            r = c.put("/admin/routing", json=body)
            assert r.status_code == 422, r.text
            return r.json()

        missing = refused(
            {"arms": [{"name": "a", "bundle": str(tmp_path / "nope"), "weight": 1}], "salt": "s"}
        )
        assert missing["error"] == "invalid_routing" and missing["detail"][0]["field"] == "arms[0].bundle"
        too_many = refused({**_two_arms(bundle, bundle_v2), "shadows": [{"bundle": str(bundle_v3.path)}]})
        assert "DIN_MAX_MODELS is 2" in too_many["message"]
        zero = refused(_two_arms(bundle, bundle_v2, 0, 0))
        assert zero["detail"][0]["field"] == "arms"
        negative = refused(_two_arms(bundle, bundle_v2, -1, 1))  # the schema's check: names the field
        assert negative["detail"][0]["field"].endswith("weight")
        wrong = refused(
            {"arms": [{"name": "a", "bundle": str(bundle.path), "model_version": "test-v2", "weight": 1}]}
        )
        assert "holds model version test-v1" in wrong["message"]
        unknown = refused({"arms": [{"name": "a", "model_version": "test-v9", "weight": 1}]})
        assert unknown["detail"][0]["field"] == "arms[0].model_version"

        stale = c.put(
            "/admin/routing", json={**_two_arms(bundle, bundle_v2, 0.7, 0.3), "expected_revision": 0}
        )
        assert stale.status_code == 409 and stale.json()["revision"] == revision

        # a routing written straight to Redis that this replica cannot load: refused here, old one stays
        client = redis.Redis.from_url(redis_url)
        doc = orjson.loads(client.get("din:routing"))
        doc["revision"] += 1
        doc["current"]["revision"] = doc["revision"]
        doc["current"]["arms"][1]["bundle"] = str(tmp_path / "gone")
        doc["current"]["arms"][1]["model_version"] = "test-v7"
        client.set("din:routing", orjson.dumps(doc))
        deadline = time.monotonic() + 10
        while (models := c.get("/admin/models").json())["refused"] is None:
            assert time.monotonic() < deadline, models
            time.sleep(0.05)
        assert models["refused"]["revision"] == doc["revision"] and "test-v7" in models["refused"]["reason"]
        assert models["revision"] == revision  # still the old routing
        assert _rank(c, "u1").json()["routing_revision"] == revision
        assert metric_value(c.get("/metrics").text, "din_routing_refused_total") == 1


def test_three_replicas_on_one_redis_agree_after_a_change(
    bundle: BundleInfo, bundle_v2: BundleInfo, redis_url: str
) -> None:
    settings = make_settings(bundle.path, redis_url, routing_poll_s=0.2)
    with LiveServer(settings) as a, LiveServer(settings) as b, LiveServer(settings) as c3:
        for s in (a, b, c3):
            s.wait_ready()
        clients = [s.client() for s in (a, b, c3)]
        try:
            first = clients[0].put("/admin/routing", json=_two_arms(bundle, bundle_v2, 0.8, 0.2))
            assert first.status_code == 200
            changed = clients[1].put("/admin/routing", json=_two_arms(bundle, bundle_v2, 0.5, 0.5))
            assert changed.status_code == 200
            revision = changed.json()["revision"]
            t0 = time.monotonic()
            while {c.get("/admin/models").json()["revision"] for c in clients} != {revision}:
                assert time.monotonic() - t0 < 3, "replicas did not follow within 3 s"
                time.sleep(0.05)
            users = [f"user-{k}" for k in range(30)]
            arms = [[_rank(c, u).json()["arm"] for u in users] for c in clients]
            assert arms[0] == arms[1] == arms[2]
            assert {"control", "treatment"} <= set(arms[0])
        finally:
            for c in clients:
                c.close()


def test_a_routing_change_and_a_promotion_under_load_fail_nothing(
    server: LiveServer, bundle: BundleInfo, bundle_v2: BundleInfo
) -> None:
    in_force: dict[int, dict[str, str]] = {}  # revision -> arm -> version

    async def go() -> list[httpx.Response]:
        async with server.async_client() as c:
            answers: list[httpx.Response] = []
            stop = asyncio.Event()

            async def load() -> None:
                k = 0
                while not stop.is_set():  # open loop: a request every 10 ms, not waiting for answers
                    body = {"user_id": f"u{k % 200}", "candidates": CANDIDATES}
                    answers_task = asyncio.ensure_future(c.post("/rank", json=body))
                    answers_task.add_done_callback(lambda t: answers.append(t.result()))
                    k += 1
                    await asyncio.sleep(0.01)

            async def change(method: str, path: str, body: Any = None) -> None:
                r = await c.request(method, path, json=body)
                assert r.status_code == 200, r.text
                routing = r.json()["routing"]
                in_force[r.json()["revision"]] = {a["name"]: a["model_version"] for a in routing["arms"]}

            runner = asyncio.ensure_future(load())
            await asyncio.sleep(0.5)
            await change("PUT", "/admin/routing", _two_arms(bundle, bundle_v2, 0.9, 0.1))
            await asyncio.sleep(0.5)
            await change("PUT", "/admin/routing", _two_arms(bundle, bundle_v2, 0.5, 0.5))
            await asyncio.sleep(0.5)
            await change("POST", "/admin/routing/promote", {"arm": "treatment"})
            await asyncio.sleep(0.5)
            await change("POST", "/admin/routing/rollback")
            await asyncio.sleep(0.5)
            stop.set()
            await runner
            await asyncio.sleep(1.0)  # the last answers
            return answers

    answers = asyncio.run(go())
    assert len(answers) > 150
    assert [(r.status_code, r.text) for r in answers if r.status_code != 200] == []
    revisions = set()
    for r in answers:
        body = r.json()
        if body["routing_revision"] is None:
            assert body["model_version"] == "test-v1"  # before the first routing
            continue
        revisions.add(body["routing_revision"])
        assert in_force[body["routing_revision"]][body["arm"]] == body["model_version"]
    assert len(revisions) >= 3


def test_a_shadow_scores_on_idle_cpu_and_is_shed_first(
    bundle: BundleInfo, bundle_v2: BundleInfo, bundle_v3: BundleInfo, redis_url: str
) -> None:
    body = {
        **_two_arms(bundle, bundle_v2, 1.0, 0.0),
        "shadows": [{"bundle": str(bundle_v3.path), "sample_rate": 1.0}],
    }
    settings = make_settings(bundle.path, redis_url, log_impressions=True)
    with LiveServer(settings) as server, server.client() as c:
        server.wait_ready()
        assert c.put("/admin/routing", json=body).status_code == 200
        served = {}
        for k in range(20):
            answer = _rank(c, f"u{k}").json()
            assert answer["model_version"] == "test-v1"  # a shadow is never shown
            served[answer["impression_id"]] = answer
        deadline = time.monotonic() + 10
        while metric_value(text := c.get("/metrics").text, "din_shadow_scored_total") < 20:
            assert time.monotonic() < deadline, "the shadow did not score the 20 requests"
            time.sleep(0.05)
        labels = {"model_version": "test-v3"}
        # v3 has v1's weights: its top k is the served top k, every time
        assert metric_value(text, "din_shadow_topk_overlap_sum", labels) == 20
        assert metric_value(text, "din_shadow_topk_overlap_count", labels) == 20
        # scored in the worker process, at the idle class (not in this one: its GIL is the server's)
        worker = server.app.state.din.shadows._worker
        assert worker.usable and worker.starts == 1 and worker.pid is not None
        assert os.sched_getscheduler(worker.pid) == os.SCHED_IDLE
        # giving way to the served requests (DIN_SHADOW_YIELD, the default): the batcher's queue counts them
        # into the signal the worker reads, and with every answer sent it is back to none pending
        din = server.app.state.din
        assert din.shadows.served_work is not None and not din.shadows.served_work.busy()
        assert din.batcher.inference.on_scoring == din.shadows.served_work.set
        # a worker that dies costs the batch it was scoring, never an answer: the next batch starts another
        os.kill(worker.pid, signal.SIGKILL)
        for k in range(20, 30):
            answer = _rank(c, f"u{k}").json()
            served[answer["impression_id"]] = answer
        deadline = time.monotonic() + 10
        while metric_value(text := c.get("/metrics").text, "din_shadow_scored_total") < 29:
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        assert worker.starts == 2
        failed = metric_value(text, "din_shadow_shed_total", {"model_version": "test-v3", "reason": "failed"})
        scored = metric_value(text, "din_shadow_scored_total")
        assert scored + failed == 30 and failed <= 1
        models = c.get("/admin/models").json()
        assert {v["model_version"]: v["shadow_sample_rate"] for v in models["versions"]}["test-v3"] == 1.0
        # in the impression log beside the answers: the shadow's scores of the items shown, and its ranks
        deadline = time.monotonic() + 10
        while len(records := _shadow_records(redis_url)) < scored:
            assert time.monotonic() < deadline, records
            time.sleep(0.05)
    assert len(records) == scored and set(records) <= set(served)
    for impression_id, record in records.items():
        answer = served[impression_id]
        assert record["model_version"] == "test-v3" and record["user_id"] == answer["user_id"]
        assert record["items"] == CANDIDATES  # the logged items, in the request's order (as the impression)
        place = {i["item_id"]: k for k, i in enumerate(answer["items"])}
        score = {i["item_id"]: i["score"] for i in answer["items"]}
        # v1's weights: v1's scores, and each item ranked where the served answer put it
        assert record["scores"] == pytest.approx([score[i] for i in CANDIDATES], abs=1e-6)
        assert record["positions"] == [place[i] for i in CANDIDATES]

    # no idle time for it (here: an age limit nothing meets): shed and counted, answers untouched
    settings = make_settings(bundle.path, redis_url, shadow_max_age_ms=0.001)
    with LiveServer(settings) as server, server.client() as c:
        server.wait_ready()
        for k in range(10):
            assert _rank(c, f"u{k}").status_code == 200
        deadline = time.monotonic() + 10
        shed = {"model_version": "test-v3", "reason": "too_old"}
        while metric_value(text := c.get("/metrics").text, "din_shadow_shed_total", shed) < 10:
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        assert metric_value(text, "din_shadow_scored_total") == 0

    # DIN_SHADOW_YIELD=false: no signal, the shadow scores whenever a core is idle, the same way
    settings = make_settings(bundle.path, redis_url, shadow_yield=False)
    with LiveServer(settings) as server, server.client() as c:
        server.wait_ready()
        assert server.app.state.din.shadows.served_work is None
        assert server.app.state.din.batcher.inference.on_scoring is None
        for k in range(5):
            assert _rank(c, f"u{k}").status_code == 200
        deadline = time.monotonic() + 10
        while metric_value(text := c.get("/metrics").text, "din_shadow_scored_total") < 5:
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        labels = {"model_version": "test-v3"}
        assert metric_value(text, "din_shadow_topk_overlap_sum", labels) == 5


def _shadow_records(redis_url: str) -> dict[str, dict[str, Any]]:
    """The shadow records in the impression stream, by impression id."""
    client = redis.Redis.from_url(redis_url)
    entries = client.xrange("din:log:imp")
    records = [orjson.loads(fields[b"record"]) for _, fields in entries]
    return {r["impression_id"]: r for r in records if r.get("type") == "shadow"}


def _din(*args: str) -> subprocess.CompletedProcess[str]:
    """`din ARGS` as a user runs it (its exit status is the test's to check)."""
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300)


def test_din_models_has_the_same_verbs(server: LiveServer, bundle: BundleInfo, bundle_v2: BundleInfo) -> None:
    url = server.url
    routed = _din(
        "models",
        "route",
        "--url",
        url,
        "--arm",
        f"control={bundle.path}:3",
        "--arm",
        f"treatment={bundle_v2.path}",
    )
    assert routed.returncode == 0, routed.stderr
    assert "control" in routed.stdout and "75.00%" in routed.stdout and "25.00%" in routed.stdout
    promoted = _din("models", "promote", "treatment", "--url", url)
    assert promoted.returncode == 0 and "100.00%" in promoted.stdout
    with server.client() as c:
        assert _rank(c, "u1").json()["model_version"] == "test-v2"
    back = _din("models", "rollback", "--url", url)
    assert back.returncode == 0 and "75.00%" in back.stdout
    refused = _din("models", "route", "--url", url, "--arm", "a=/no/such/bundle")
    assert refused.returncode == 1 and "arms[0].bundle" in refused.stderr
    bad = _din("models", "route", "--url", url, "--arm", "no-equals-sign")
    assert bad.returncode == 2 and "NAME=VERSION_OR_BUNDLE" in bad.stderr
    cleared = _din("models", "clear", "--url", url)
    assert cleared.returncode == 0 and "none in force" in cleared.stdout


def test_redis_down_keeps_the_routing_in_force_and_refuses_changes(
    bundle: BundleInfo, bundle_v2: BundleInfo, redis_url: str
) -> None:
    with FaultProxy(redis_url) as proxy:
        settings = make_settings(bundle.path, proxy.url, routing_poll_s=0.1)
        with LiveServer(settings) as server, server.client() as c:
            server.wait_ready()
            assert c.put("/admin/routing", json=_two_arms(bundle, bundle_v2)).status_code == 200
            arms = {u: _rank(c, u).json()["arm"] for u in (f"u{k}" for k in range(20))}
            proxy.refuse()
            proxy.cut()
            time.sleep(0.5)  # several polls find Redis gone
            for user, arm in arms.items():
                answer = _rank(c, user)
                assert answer.status_code == 200 and answer.json()["degraded"] is True
                assert answer.json()["arm"] == arm  # the routing it had stays in force
            down = c.put("/admin/routing", json=_two_arms(bundle, bundle_v2, 0.1, 0.9))
            assert down.status_code == 503 and down.json()["error"] == "store_unavailable"
            assert c.post("/admin/routing/promote", json={"arm": "control"}).status_code == 503
            proxy.refuse(False)
            deadline = time.monotonic() + 10
            while (
                r := c.put("/admin/routing", json=_two_arms(bundle, bundle_v2, 0.1, 0.9))
            ).status_code != 200:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.1)
