"""Redis failing under a running `din serve`, as a client sees it: killed outright (SIGKILL) and
restarted on the same port and data directory, or frozen (SIGSTOP) and thawed. The service never
answers anything but 200 or 503 overloaded, degrades while Redis is gone, and serves personalised
scores again (equal to the PyTorch reference for each user's own history) once Redis is back, without
being restarted itself.

Real processes throughout: a redis-server of the test's own (EmbeddedRedis on a fixed TCP port, so it
can be killed and restarted), `din serve`, ONNX Runtime, HTTP. Assertions are about behaviour
(statuses, bodies, scores to 1e-5) with generous time bounds, never about speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.store.embedded import EmbeddedRedis
from service.store.keys import DEFAULT_PREFIX, history_key
from tests.service.conftest import MAX_HISTORY, BundleInfo, ServeOutput, start_serve, stop_serve

TOL = 1e-5
N_USERS = 8
CANDIDATES = [f"i{k}" for k in range(40, 52)]


# ------------------------------------------------------------------ shared helpers


def make_histories(n_users: int, seed: int, items: list[str]) -> dict[str, list[str]]:
    """Distinct histories, newest first; some longer than T (the service reads only T of them)."""
    rng = random.Random(seed)
    pool = items[2:]  # no <pad>, <oov>
    return {f"user-{u}": rng.sample(pool, rng.randint(3, MAX_HISTORY + 5)) for u in range(n_users)}


def seed_histories(url: str, histories: dict[str, list[str]]) -> None:
    r = redis.Redis.from_url(url, socket_timeout=5)
    try:
        with r.pipeline(transaction=True) as p:
            for user, hist in histories.items():
                key = history_key(DEFAULT_PREFIX, user)
                p.delete(key)
                p.rpush(key, *hist)  # the list's head is the newest, as LPUSH of events leaves it
            p.execute()
    finally:
        r.close()


class Reference:
    """The PyTorch reference per user, with and without their history (computed once)."""

    def __init__(self, bundle: BundleInfo, histories: dict[str, list[str]], candidates: list[str]) -> None:
        self.histories = histories
        self.empty = dict(zip(candidates, bundle.reference(candidates, []), strict=True))
        self.personal = {
            user: dict(zip(candidates, bundle.reference(candidates, hist), strict=True))
            for user, hist in histories.items()
        }

    def check(self, user: str, body: dict[str, Any]) -> None:
        """A 200 body: personalised (that user's own history) or degraded (empty history), exactly."""
        got = {it["item_id"]: it["score"] for it in body["items"]}
        assert body["user_id"] == user
        if body["degraded"]:
            assert body["history_length"] == 0, body
            want = self.empty
        else:
            assert body["history_length"] == min(len(self.histories[user]), MAX_HISTORY), body
            want = self.personal[user]
        assert got.keys() == want.keys()
        for item, score in want.items():
            assert abs(got[item] - score) <= TOL, (user, body["degraded"], item, got[item], score)


@contextlib.contextmanager
def own_redis(data_dir: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own on a free TCP port; every write fsynced (a SIGKILL loses none)."""
    server = EmbeddedRedis(data_dir, port=0, unix_socket=False).start()
    try:
        r = redis.Redis.from_url(server.url, socket_timeout=5)
        r.config_set("appendfsync", "always")
        r.close()
        yield server
    finally:
        server.stop(timeout=5)


@contextlib.contextmanager
def serving(bundle: BundleInfo, redis_url: str, *extra: str) -> Iterator[tuple[Any, str, ServeOutput]]:
    proc, url = start_serve(
        "--bundle", str(bundle.path), "--redis-url", redis_url, "--shutdown-drain-s", "0",
        "--intra-op-threads", "1", "--log-level", "WARNING", *extra,
    )  # fmt: skip
    out = ServeOutput(proc)
    try:
        yield proc, url, out
    finally:
        stop_serve(proc)
        out.close()


@dataclass
class Answer:
    user: str
    sent: float  # time.monotonic()
    done: float
    status: int  # 0: no HTTP answer at all
    body: dict[str, Any]
    error: str = ""


class Load:
    """Closed-loop /rank load from a thread of its own (the test's thread kills and restarts Redis):
    `workers` clients, each sending its next request as soon as the previous one is answered."""

    def __init__(self, url: str, users: list[str], workers: int = 4) -> None:
        self.url, self.users, self.workers = url, users, workers
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the load did not stop"

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.workers, max_keepalive_connections=self.workers)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as client:
            await asyncio.gather(*(self._worker(client, w) for w in range(self.workers)))

    async def _worker(self, client: httpx.AsyncClient, w: int) -> None:
        k = w
        while not self._stop.is_set():
            user = self.users[k % len(self.users)]
            k += 1
            t0 = time.monotonic()
            try:
                r = await client.post("/rank", json={"user_id": user, "candidates": CANDIDATES})
                json = r.headers.get("content-type", "").startswith("application/json")
                body = r.json() if json else {"not_json": r.text[:200]}
                self.answers.append(Answer(user, t0, time.monotonic(), r.status_code, body))
            except httpx.HTTPError as e:
                self.answers.append(Answer(user, t0, time.monotonic(), 0, {}, f"{type(e).__name__}: {e}"))


def assert_only_200_or_overloaded(answers: list[Answer], out: ServeOutput) -> None:
    bad = [
        a
        for a in answers
        if a.status not in (200, 503) or (a.status == 503 and a.body.get("error") != "overloaded")
    ]
    assert not bad, f"{len(bad)} answers other than 200 / 503 overloaded, e.g. {bad[:3]}\n{out.tail()}"


# ------------------------------------------------------------------ 1. killed, then restarted

OUTAGE_S = 2.0
RECOVERY_S = 2.0  # answers sent this long after the restart must be personalised


@pytest.mark.slow
def test_redis_killed_under_load_then_restarted(bundle: BundleInfo, tmp_path: Path) -> None:
    histories = make_histories(N_USERS, seed=1, items=bundle.items)
    ref = Reference(bundle, histories, CANDIDATES)
    data_dir = tmp_path / "redis"
    server = EmbeddedRedis(data_dir, port=0, unix_socket=False).start()
    try:
        r = redis.Redis.from_url(server.url, socket_timeout=5)
        r.config_set("appendfsync", "always")  # the seeded histories survive the SIGKILL
        r.close()
        seed_histories(server.url, histories)
        port, redis_url = server.port, server.url
        # generous budgets: on a loaded machine the load itself must not be shed nor degraded
        args = ("--request-timeout-ms", "1000", "--redis-timeout-ms", "500")
        with serving(bundle, redis_url, *args) as (proc, url, out):
            with Load(url, list(histories)) as load:
                time.sleep(1.0)  # healthy
                t_kill = time.monotonic()
                assert server.pid is not None
                os.kill(server.pid, signal.SIGKILL)
                server.stop(timeout=5)  # reaps it and releases the data directory's lock
                t_killed = time.monotonic()
                time.sleep(OUTAGE_S)
                t_restart = time.monotonic()
                server = EmbeddedRedis(data_dir, port=port, unix_socket=False).start()  # same port, same data
                t_restarted = time.monotonic()
                time.sleep(RECOVERY_S + 1.5)
            assert proc.poll() is None, f"din serve died\n{out.tail()}"
            answers = load.answers
            assert_only_200_or_overloaded(answers, out)
            # What was on disk came back with the restarted server.
            r = redis.Redis.from_url(server.url, socket_timeout=5, decode_responses=True)
            for user, hist in histories.items():
                assert r.lrange(history_key(DEFAULT_PREFIX, user), 0, -1) == hist
            r.close()
    finally:
        server.stop(timeout=5)

    ok = [a for a in answers if a.status == 200]
    for a in ok:  # every 200, whenever it came: that user's own scores, or the empty-history ones
        ref.check(a.user, a.body)

    before = [a for a in ok if a.done < t_kill]
    assert before and not any(a.body["degraded"] for a in before), "degraded before Redis was killed"

    outage = [a for a in ok if a.sent > t_killed and a.done < t_restart]
    assert len(outage) >= 5, f"only {len(outage)} answers while Redis was down"
    assert all(a.body["degraded"] and a.body["history_length"] == 0 for a in outage)

    recovered = [a for a in ok if a.sent >= t_restarted + RECOVERY_S]
    assert len(recovered) >= 5, f"only {len(recovered)} answers after the recovery window"
    late = [a for a in recovered if a.body["degraded"]]
    assert not late, f"{len(late)} answers still degraded {RECOVERY_S}s after the restart\n{out.tail()}"
    personal = [a for a in ok if a.sent >= t_restarted and not a.body["degraded"]]
    first = min(a.done for a in personal) - t_restarted
    assert first < RECOVERY_S, f"first personalised answer {first:.2f}s after the restart"


# ------------------------------------------------------------------ 2. frozen (SIGSTOP)

BUDGET_MS = 250.0  # DIN_REQUEST_TIMEOUT_MS (the default)
SLACK_MS = 750.0  # a loaded 2-core machine; a service waiting on the frozen Redis would take seconds
FREEZE_LOAD_S = 2.0


@pytest.mark.slow
def test_redis_frozen_answers_within_the_deadline_then_recovers(bundle: BundleInfo, tmp_path: Path) -> None:
    histories = make_histories(N_USERS, seed=2, items=bundle.items)
    ref = Reference(bundle, histories, CANDIDATES)
    with own_redis(tmp_path / "redis") as server:
        seed_histories(server.url, histories)
        args = ("--request-timeout-ms", str(BUDGET_MS), "--redis-timeout-ms", "100")
        with (
            serving(bundle, server.url, *args) as (proc, url, out),
            httpx.Client(base_url=url, timeout=30) as c,
        ):
            for user in histories:  # healthy first
                r = c.post("/rank", json={"user_id": user, "candidates": CANDIDATES})
                assert r.status_code == 200 and not r.json()["degraded"], r.text
                ref.check(user, r.json())

            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            try:
                with Load(url, list(histories)) as load:
                    time.sleep(FREEZE_LOAD_S)
                ready = c.get("/readyz")
            finally:
                os.kill(server.pid, signal.SIGCONT)
            answers = load.answers
            assert_only_200_or_overloaded(answers, out)
            # frozen Redis: the replica still answers (degraded), so it stays ready and says so
            assert ready.status_code == 200, ready.text
            assert ready.json()["redis"] == "down" and ready.json()["degraded"] is True
            slow = [a for a in answers if (a.done - a.sent) * 1000 > BUDGET_MS + SLACK_MS]
            assert not slow, f"{len(slow)} answers past the deadline + slack, e.g. {slow[:2]}"
            ok = [a for a in answers if a.status == 200]
            assert len(ok) >= 5, f"only {len(ok)} answers while Redis was frozen"
            for a in ok:
                assert a.body["degraded"] and a.body["history_length"] == 0, a
                ref.check(a.user, a.body)

            # Thawed: ready again, and every user gets their own history back. Replies Redis sends now to
            # the commands it queued while frozen must not reach anyone: several rounds, concurrent users.
            deadline = time.monotonic() + 10
            while c.get("/readyz").json().get("redis") != "up":
                assert time.monotonic() < deadline, f"redis not up 10s after SIGCONT\n{out.tail()}"
                time.sleep(0.05)

            async def round_() -> list[tuple[str, httpx.Response]]:
                async with httpx.AsyncClient(base_url=url, timeout=30) as ac:
                    users = list(histories)
                    rs = await asyncio.gather(
                        *(ac.post("/rank", json={"user_id": u, "candidates": CANDIDATES}) for u in users)
                    )
                    return list(zip(users, rs, strict=True))

            personalised = dict.fromkeys(histories, 0)
            for _ in range(5):
                for user, r in asyncio.run(round_()):
                    assert r.status_code in (200, 503), r.text
                    if r.status_code == 503:
                        assert r.json()["error"] == "overloaded", r.text
                        continue
                    ref.check(user, r.json())  # never another user's history
                    personalised[user] += not r.json()["degraded"]
            # (a Redis read slower than DIN_REDIS_TIMEOUT_MS on a loaded machine may still degrade one)
            assert all(personalised.values()), f"users never personalised after SIGCONT: {personalised}"
            assert proc.poll() is None
