"""din-rank on a real Redis Cluster (3 masters + 3 replicas on loopback), as an operator runs it:
`din seed --redis-cluster`, `din serve --redis-cluster`. The scores equal a single Redis's to 1e-5;
a master SIGKILLed under a steady stream of /rank gives only 200s (degraded while its slots have no
master) and personalised answers again once its replica is promoted, without a restart."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import httpx
import pytest

import cli
from service.store.keys import history_key
from tests.redis_cluster import LocalCluster
from tests.redis_cluster import cluster_url as cluster_url  # fixtures
from tests.redis_cluster import redis_cluster as redis_cluster
from tests.service.conftest import MAX_HISTORY, BundleInfo, LiveServer, make_settings
from tests.service.test_faults import CANDIDATES, Load, Reference, make_histories, serving

TOL = 1e-5


def write_reviews(path: Path, histories: dict[str, list[str]]) -> Path:
    """A SNAP reviews file whose latest reviews per user are `histories` (newest first)."""
    with open(path, "w") as fh:
        for user, hist in histories.items():
            for age, item in enumerate(hist):
                row = {"reviewerID": user, "asin": item, "unixReviewTime": 1_000_000 - age, "overall": 5.0}
                fh.write(json.dumps(row) + "\n")
    return path


@pytest.mark.slow
def test_seeded_and_served_through_a_cluster_it_ranks_as_a_single_redis(
    bundle: BundleInfo, cluster_url: str, redis_url: str, tmp_path: Path
) -> None:
    histories = make_histories(24, seed=5, items=bundle.items)
    reviews = write_reviews(tmp_path / "reviews.json", histories)
    T = str(MAX_HISTORY)
    assert cli.main(["seed", "--reviews", str(reviews), "--redis-url", cluster_url, "--redis-cluster",
                     "--max-history", T, "--no-progress"]) == 0  # fmt: skip
    assert cli.main(["seed", "--reviews", str(reviews), "--redis-url", redis_url,
                     "--max-history", T, "--no-progress"]) == 0  # fmt: skip
    rng = random.Random(3)
    bodies = [{"user_id": u, "candidates": rng.sample(bundle.items[2:], 30)} for u in histories]
    with (
        serving(bundle, cluster_url, "--redis-cluster") as (_, url, out),
        httpx.Client(base_url=url, timeout=30) as c,
        LiveServer(make_settings(bundle.path, redis_url)) as single,
        single.client() as s,
    ):
        single.wait_ready()
        for body in bodies:
            got, want = c.post("/rank", json=body), s.post("/rank", json=body)
            assert got.status_code == 200 and want.status_code == 200, (got.text, out.tail())
            g, w = got.json(), want.json()
            assert not g["degraded"] and g["history_length"] == w["history_length"] > 0
            assert [i["item_id"] for i in g["items"]] == [i["item_id"] for i in w["items"]]
            for a, b in zip(g["items"], w["items"], strict=True):
                assert abs(a["score"] - b["score"]) <= TOL
        # /events through the cluster: the next /rank sees it; a retry is a duplicate
        user = bodies[0]["user_id"]
        event = {"events": [{"user_id": user, "item_id": "i7", "event_id": "click-1"}]}
        assert c.post("/events", json=event).json() == {"written": 1, "duplicates": 0}
        assert c.post("/events", json=event).json() == {"written": 0, "duplicates": 1}
        r = c.post("/rank", json=bodies[0]).json()
        assert r["history_length"] == min(len(histories[user]) + 1, MAX_HISTORY) and not r["degraded"]
        assert c.get("/readyz").status_code == 200


RECOVERY_S = 3.0  # answers sent this long after the promotion was seen must all be personalised


@pytest.mark.slow
def test_a_master_killed_under_load_degrades_then_recovers_without_restart(
    bundle: BundleInfo, tmp_path: Path
) -> None:
    histories = make_histories(12, seed=6, items=bundle.items)
    ref = Reference(bundle, histories, CANDIDATES)
    with LocalCluster(tmp_path / "cluster") as cluster:
        reviews = write_reviews(tmp_path / "reviews.json", histories)
        assert cli.main(["seed", "--reviews", str(reviews), "--redis-url", cluster.url, "--redis-cluster",
                         "--max-history", str(MAX_HISTORY), "--no-progress"]) == 0  # fmt: skip
        cluster.wait_replicated()  # the replicas hold the histories before their master dies
        victim = cluster.master_of(history_key("din:", "user-0"))
        heir = cluster.replica_of(victim)
        on_victim = [u for u in histories if cluster.master_of(history_key("din:", u)) is victim]
        # generous budgets: on a loaded 2-core machine the load itself must not be shed
        args = ("--redis-cluster", "--request-timeout-ms", "1000", "--redis-timeout-ms", "300")
        with serving(bundle, cluster.url, *args) as (proc, url, out):
            with Load(url, list(histories)) as load:
                time.sleep(1.0)  # healthy
                t_kill = time.monotonic()
                cluster.kill(victim)
                t_promoted = cluster.wait_promoted(heir)
                time.sleep(RECOVERY_S + 1.5)
            assert proc.poll() is None, f"din serve died\n{out.tail()}"
            answers = load.answers
    bad = [a for a in answers if a.status != 200]
    assert not bad, f"{len(bad)} answers other than 200, e.g. {bad[:3]}\n{out.tail()}"
    for a in answers:  # every answer: that user's own scores, or the empty-history ones, exactly
        ref.check(a.user, a.body)
    before = [a for a in answers if a.done < t_kill]
    assert before and not any(a.body["degraded"] for a in before), "degraded before the kill"
    degraded = [a for a in answers if a.body["degraded"]]
    assert degraded and {a.user for a in degraded} & set(on_victim), "nobody noticed the dead master"
    after = [a for a in answers if a.sent >= t_promoted + RECOVERY_S]
    assert len(after) >= 5, f"only {len(after)} answers after the recovery window"
    late = [a for a in after if a.body["degraded"]]
    assert not late, f"{len(late)} answers still degraded {RECOVERY_S}s after the promotion\n{out.tail()}"
    assert {a.user for a in after} >= set(on_victim), "the dead master's users were not served again"


def test_events_partly_written_answer_503_naming_who_was_written(
    bundle: BundleInfo, cluster_url: str, redis_cluster: LocalCluster
) -> None:
    users = [f"user-{k}" for k in range(12)]
    refusing = redis_cluster.master_of(history_key("din:", users[0]))
    on_it = {u for u in users if redis_cluster.master_of(history_key("din:", u)) is refusing}
    assert 0 < len(on_it) < len(users)
    body = {"events": [{"user_id": u, "item_id": "i5", "event_id": f"e-{u}"} for u in users]}
    settings = make_settings(bundle.path, cluster_url, redis_cluster=True)
    with LiveServer(settings) as server, server.client() as c:
        server.wait_ready()
        with refusing.client() as r:  # that master refuses the scripts (NOPERM); the others write
            r.execute_command("ACL", "SETUSER", "default", "-evalsha", "-eval")
        try:
            resp = c.post("/events", json=body)
        finally:
            with refusing.client() as r:
                r.execute_command("ACL", "SETUSER", "default", "+@all")
        assert resp.status_code == 503, resp.text
        got = resp.json()
        assert got["error"] == "store_partial" and "nothing was written" not in got["message"]
        assert set(got["written_users"]) == set(users) - on_it and set(got["not_written_users"]) == on_it
        assert got["unknown_users"] == [] and got["written"] == len(users) - len(on_it)
        assert "127.0.0.1" not in resp.text and "NOPERM" not in resp.text  # Redis internals stay in the log
        # what the answer says is what /rank sees; the retry writes the rest and skips the others
        for u in users:
            r = c.post("/rank", json={"user_id": u, "candidates": ["i5", "i6"]}).json()
            assert r["history_length"] == (0 if u in on_it else 1), (u, r)
        assert c.post("/events", json=body).json() == {
            "written": len(on_it),
            "duplicates": len(users) - len(on_it),
        }
