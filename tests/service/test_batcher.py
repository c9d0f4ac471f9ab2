"""The micro-batcher on its own: real ONNX Runtime, real redis-server (behind a gate for stalls)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from contracts.bundle import load_bundle
from contracts.errors import InferenceFailed, Overloaded, ShuttingDown
from contracts.vocab import Vocab
from service.batcher import Batcher
from service.costs import RecentMedian
from service.errors import http_headers
from service.inference import RankResult
from service.live import ModelSet
from service.metrics import Metrics
from service.ranker import Ranker
from service.store.client import RedisConfig, async_client
from service.store.embedded import free_port
from service.store.history import HistoryStore
from tests.service.conftest import Blackhole, BundleInfo, GatedProxy

TOL = 1e-5


@pytest.fixture(scope="module")
def ranker(bundle: BundleInfo) -> Ranker:
    return Ranker(load_bundle(bundle.path), providers=["CPUExecutionProvider"], intra_op_threads=1)


@asynccontextmanager
async def running(ranker: Ranker, url: str, **kw: Any) -> AsyncIterator[Batcher]:
    client = async_client(url, RedisConfig(connect_timeout_s=5, timeout_s=5, max_connections=8))
    opts: dict[str, Any] = {"max_delay_s": 0.002, "max_candidates": 4096, "queue_max": 64, "max_inflight": 1}
    batcher = Batcher(ModelSet.single(ranker), HistoryStore(client, "din:"), Metrics(), **{**opts, **kw})
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop()
        await client.aclose()


def sample(batcher: Batcher, name: str, labels: dict[str, str] | None = None) -> float:
    return batcher.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.002)


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(fn())  # type: ignore[arg-type]


def test_concurrent_submits_share_one_call_and_keep_their_scores(ranker: Ranker, redis_url: str) -> None:
    rows = [([f"i{k}", f"i{k + 1}", "unknown"], [f"i{k + 50}"] * (k % 5)) for k in range(2, 22)]
    want = [row.scores for row in ranker.score_batch([(c, h) for c, h in rows])]

    async def go() -> None:
        async with running(ranker, redis_url, max_delay_s=0.2) as b:
            results = await asyncio.gather(*(b.submit("u", c, h) for c, h in rows))
            assert b.batches == 1  # all 20 arrived within the first one's 200 ms
            for got, expected, (_, h) in zip(results, want, rows, strict=True):
                np.testing.assert_allclose(got.scores, expected, atol=TOL, rtol=0)
                assert got.history_length == len(h) and got.degraded is None
            assert sample(b, "din_batch_requests_sum") == 20

    run(go)


def test_max_delay_holds_a_batch_open_for_late_arrivals(ranker: Ranker, redis_url: str) -> None:
    async def go() -> None:
        # The consumer sees the first request alone and waits up to max_delay for company.
        async with running(ranker, redis_url, max_delay_s=1.0) as b:
            t0 = time.perf_counter()
            first = asyncio.create_task(b.submit("a", ["i2"], []))
            await asyncio.sleep(0.05)  # the consumer has looked at the queue and is waiting
            assert b.batches == 0 and b.depth == 1
            second = await b.submit("b", ["i3"], [])
            assert (await first).scores.shape == second.scores.shape == (1,)
            assert b.batches == 1  # the late arrival joined the first request's batch
            assert time.perf_counter() - t0 >= 1.0  # which closed when the delay ran out
        # Without a delay, a request arriving after the consumer took the first one waits for the next.
        async with running(ranker, redis_url, max_delay_s=0.0) as b:
            first = asyncio.create_task(b.submit("a", ["i2"], []))
            await until(lambda: b.depth == 0 and sample(b, "din_queue_admitted_total") == 1)
            await b.submit("b", ["i3"], [])
            await first
            assert b.batches == 2

    run(go)


def test_inference_counts_its_graph_calls_while_they_run(ranker: Ranker, redis_url: str) -> None:
    """What shadows give way to (service.shadow_worker.ServedWork): each change, 0 when all is done."""

    async def go() -> None:
        async with running(
            ranker, redis_url, max_delay_s=0.05, max_candidates=300, workers=2, max_inflight=2
        ) as b:
            seen: list[int] = []
            b.inference.on_scoring = seen.append
            await b.submit("u", ["i2"], [])
            assert seen == [1, 0]  # one graph call: started, done
            seen.clear()
            # four batches (one request each: 298 candidates, 300 a batch at most), two workers: one step
            # up and one down per call, and 0 at the end
            big = [f"i{k}" for k in range(2, 300)]
            await asyncio.gather(*(b.submit("u", big, []) for _ in range(4)))
            assert seen[0] == 1 and seen[-1] == 0 and len(seen) == 8
            assert all(abs(x - y) == 1 for x, y in itertools.pairwise(seen))

    run(go)


def test_candidate_budget_closes_batches(ranker: Ranker, redis_url: str) -> None:
    async def go() -> None:
        async with running(ranker, redis_url, max_delay_s=0.2, max_candidates=10) as b:
            results = await asyncio.gather(*(b.submit("u", ["i2", "i3", "i4", "i5"], []) for _ in range(6)))
            assert len(results) == 6
            # 4 + 4 fit, the third would make 12: each batch holds at most 10 candidates
            assert b.batches == 3
            assert sample(b, "din_batch_candidates_bucket", {"le": "10.0"}) == 3
            # a request larger than the budget still runs, alone
            big = await b.submit("u", [f"i{k}" for k in range(2, 30)], [])
            assert len(big.scores) == 28

    run(go)


def test_histories_come_from_redis_in_the_batch(ranker: Ranker, redis_url: str) -> None:
    async def go() -> None:
        async with running(ranker, redis_url, max_delay_s=0.1) as b:
            await b.store.append_events([("a", "i7"), ("a", "i8"), ("b", "i9")], 100)  # type: ignore[attr-defined]
            ra, rb, rc = await asyncio.gather(
                b.submit("a", ["i2"], None), b.submit("b", ["i2"], None), b.submit("a", ["i2"], ["i3"])
            )
            rows = [(["i2"], ["i8", "i7"]), (["i2"], ["i9"]), (["i2"], ["i3"])]
            want = [row.scores for row in ranker.score_batch(rows)]
            for got, expected in zip((ra, rb, rc), want, strict=True):
                np.testing.assert_allclose(got.scores, expected, atol=TOL, rtol=0)
            assert (ra.history_length, rb.history_length, rc.history_length) == (2, 1, 1)
            assert b.batches == 1
            # one pipelined round trip for the two users without an explicit history
            assert sample(b, "din_redis_latency_seconds_count", {"op": "get_histories"}) == 1

    run(go)


def test_redis_down_degrades_only_redis_reads(ranker: Ranker) -> None:
    async def go() -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        async with running(ranker, url, max_delay_s=0.05) as b:
            cold, explicit = await asyncio.gather(b.submit("a", ["i2"], None), b.submit("a", ["i2"], ["i5"]))
            assert cold.degraded == "redis_unavailable" and cold.history_length == 0
            np.testing.assert_allclose(
                cold.scores, ranker.score_batch([(["i2"], [])])[0].scores, atol=TOL, rtol=0
            )
            assert explicit.degraded is None and explicit.history_length == 1
            assert sample(b, "din_degraded_responses_total", {"reason": "redis_unavailable"}) == 1

    run(go)


def test_cancelled_callers_are_skipped(ranker: Ranker, redis_url: str) -> None:
    async def go() -> None:
        with GatedProxy(redis_url) as proxy:
            async with running(ranker, proxy.url) as b:
                proxy.hold()
                first = asyncio.create_task(b.submit("a", ["i2"], None))  # stalls on Redis
                await until(lambda: b.inflight == 1 and b.depth == 0)
                gone = asyncio.create_task(b.submit("b", ["i3"], None))
                await until(lambda: b.depth == 1 and sample(b, "din_queue_admitted_total") == 2)
                gone.cancel()  # the caller goes away while its request waits for the next batch
                proxy.release()
                assert isinstance(await first, RankResult)
                await until(lambda: sample(b, "din_cancelled_requests_total") == 1)
                assert b.batches == 1  # the cancelled request never reached ONNX Runtime

    run(go)


def test_failed_batch_fails_every_request_of_that_batch(ranker: Ranker, redis_url: str) -> None:
    async def go() -> None:
        vocab = Vocab(ranker.vocab.ids)  # a copy: the module's ranker keeps its own
        vocab._index["poison"] = 10**6  # out of the embedding table: ONNX Runtime itself fails
        bundle = dataclasses.replace(ranker.bundle, vocab=vocab)
        poisoned = Ranker(bundle, providers=["CPUExecutionProvider"], intra_op_threads=1)
        async with running(poisoned, redis_url, max_delay_s=0.1) as b:
            results = await asyncio.gather(
                b.submit("a", ["i2", "poison"], []), b.submit("b", ["i3"], []), return_exceptions=True
            )
            assert all(isinstance(r, InferenceFailed) for r in results), results
            assert "inference failed for a batch of 2 requests" in str(results[0])
            assert sample(b, "din_batch_failures_total", {"reason": "inference_failed"}) == 1
            ok = await b.submit("c", ["i2"], [])  # the batcher lives on
            assert ok.scores.shape == (1,)

    run(go)


def test_full_queue_refuses_at_once(ranker: Ranker, redis_url: str) -> None:
    async def go() -> None:
        with GatedProxy(redis_url) as proxy:
            async with running(ranker, proxy.url, queue_max=2, max_candidates=1) as b:
                proxy.hold()
                held = [asyncio.create_task(b.submit("a", ["i2"], None))]
                await until(lambda: b.inflight == 1 and b.depth == 0)
                held.append(asyncio.create_task(b.submit("b", ["i2"], None)))  # waits for the slot
                held.append(asyncio.create_task(b.submit("c", ["i2"], None)))  # waits behind it
                await until(lambda: sample(b, "din_queue_admitted_total") == 3 and b.depth == 2)
                with pytest.raises(Overloaded) as err:
                    await b.submit("d", ["i2"], None)
                assert (
                    http_headers(err.value) == {"Retry-After": "1"}
                    and err.value.extra["reason"] == "queue_full"
                )
                proxy.release()
                assert len(await asyncio.gather(*held)) == 3

    run(go)


def test_stop_fails_waiting_requests(ranker: Ranker, redis_url: str) -> None:
    async def go() -> None:
        with GatedProxy(redis_url) as proxy:
            async with running(ranker, proxy.url, max_candidates=1) as b:
                proxy.hold()
                first = asyncio.create_task(b.submit("a", ["i2"], None))
                await until(lambda: b.inflight == 1)
                waiting = [asyncio.create_task(b.submit(u, ["i2"], None)) for u in "bc"]
                await until(lambda: sample(b, "din_queue_admitted_total") == 3)
                stopping = asyncio.create_task(b.stop())
                await asyncio.sleep(0.05)
                proxy.release()  # the running batch finishes; the others are refused
                await stopping
                assert isinstance(await first, RankResult)
                for t in waiting:
                    with pytest.raises(ShuttingDown):
                        await t
                with pytest.raises(ShuttingDown):
                    await b.submit("d", ["i2"], None)

    run(go)


def test_deadlines_shed_at_the_door_and_never_compute_late_work(ranker: Ranker, redis_url: str) -> None:
    async def go() -> None:
        with GatedProxy(redis_url) as proxy:
            async with running(ranker, proxy.url) as b:
                # Before anything was measured the expected wait is 0: nothing is shed on a guess.
                assert b.expected_wait(100) == 0.0
                await b.submit("warm", ["i2", "i3"], None, time.perf_counter() + 5)
                assert b.expected_wait(100) > 0.0  # now it knows what a candidate costs
                with pytest.raises(Overloaded) as shed:  # a deadline that no answer can meet
                    await b.submit("a", ["i2"], None, time.perf_counter())
                assert shed.value.extra["reason"] == "deadline"

                proxy.hold()  # Redis stalls: its answer would come after the deadline
                t0 = time.perf_counter()
                stuck = asyncio.create_task(b.submit("a", ["i2"], None, t0 + 0.3))
                await until(lambda: b.inflight == 1)  # its batch holds the one slot, reading
                queued = asyncio.create_task(b.submit("b", ["i3"], None, t0 + 0.15))  # waits behind it
                computed = b.batches
                # The stalled read is not waited for past the budget: answered degraded, in time.
                got = await stuck
                waited = time.perf_counter() - t0
                assert got.degraded == "redis_unavailable" and got.history_length == 0
                assert waited < 0.3, waited  # by its deadline, not whenever Redis came back
                assert b.batches == computed + 1
                with pytest.raises(Overloaded) as late:  # its deadline passed while the slot was busy
                    await queued
                assert late.value.extra["reason"] == "timeout"
                proxy.release()
                await until(lambda: b.inflight == 0 and b.depth == 0)
                assert b.batches == computed + 1  # the late request was never computed
                ok = await b.submit("c", ["i2"], None, time.perf_counter() + 5)
                assert ok.scores.shape == (1,)
            assert sample(b, "din_queue_rejections_total", {"reason": "deadline"}) == 1
            assert sample(b, "din_queue_rejections_total", {"reason": "timeout"}) == 1

    run(go)


def test_a_redis_whose_host_is_gone_costs_one_batch_a_bounded_wait_then_nothing(ranker: Ranker) -> None:
    """Connects hang (the host or container is gone): with the service's own timeouts (200 ms connect,
    100 ms read) a read would take longer than a 250 ms budget. The first batch stops waiting in time
    and answers degraded; its read's failure opens the breaker, and no later batch waits on Redis."""

    async def go() -> None:
        with Blackhole() as url:
            client = async_client(url, RedisConfig(connect_timeout_s=0.2, timeout_s=0.1, max_connections=8))
            store = HistoryStore(client, "din:")
            opts: dict[str, Any] = {"max_delay_s": 0.002, "max_candidates": 4096, "queue_max": 64}
            b = Batcher(ModelSet.single(ranker), store, Metrics(), max_inflight=1, **opts)
            b.start()
            try:
                took = []
                for k in range(12):
                    t0 = time.perf_counter()
                    got = await b.submit(f"u{k}", ["i2", "i3"], None, t0 + 0.25)
                    took.append(time.perf_counter() - t0)
                    assert got.degraded == "redis_unavailable" and got.history_length == 0
                assert max(took) < 0.25, took  # every one in its budget, the first included
                assert store.breaker is not None and store.breaker.open and store.breaker.opened == 1
                assert max(took[4:]) < 0.1, took  # with the breaker open nothing waits on a connect
                assert "not asked" in store.breaker.why()
            finally:
                await b.stop()
                await store.aclose()
                await client.aclose()

    run(go)


class _Overlap(Ranker):
    """The real ranker, counting how many of its ONNX Runtime calls run at the same moment."""

    def __init__(self, base: Ranker) -> None:
        self.__dict__.update(base.__dict__)
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0

    def score_batch(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return super().score_batch(*args, **kwargs)
        finally:
            with self._lock:
                self.running -= 1


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_run_batches_side_by_side_and_keep_each_users_scores(
    ranker: Ranker, redis_url: str, workers: int
) -> None:
    """With N inference workers, up to N batches are computed at once (never more), and every request
    still gets the scores of its own candidates against its own history."""
    rng = np.random.default_rng(workers)
    rows = [
        (
            [f"i{k}" for k in rng.integers(2, 300, 150)],
            [f"i{k}" for k in rng.integers(2, 300, int(rng.integers(0, 40)))],
        )
        for _ in range(24)
    ]
    want = [row.scores for row in ranker.score_batch(rows)]
    counting = _Overlap(ranker)

    async def go() -> None:
        opts = {"max_candidates": 150, "max_inflight": workers + 2, "workers": workers, "queue_max": 64}
        async with running(counting, redis_url, **opts) as b:
            results = await asyncio.gather(*(b.submit(f"u{k}", c, h) for k, (c, h) in enumerate(rows)))
            for got, expected in zip(results, want, strict=True):
                np.testing.assert_allclose(got.scores, expected, atol=TOL, rtol=0)
            assert b.batches == len(rows)  # 150 candidates a batch: one request each

    run(go)
    assert counting.most == workers


def test_cost_estimate_ignores_one_slow_call_and_forgets_old_ones() -> None:
    """The admission estimate is the median of recent calls: one stall does not shed a burst, and an
    estimate older than a second is dropped (else a stale high one would shed every request, and with
    nothing admitted nothing would ever correct it)."""
    recent = RecentMedian(size=15, max_age=1.0)
    assert recent.value(0.0) == 0.0
    for k in range(10):
        recent.add(1e-4, now=k * 0.01)
    recent.add(5e-2, now=0.1)  # one call 500 times slower (a VM stall)
    assert recent.value(0.1) == 1e-4
    for k in range(15):
        recent.add(2e-4, now=0.2 + k * 0.01)  # but a lasting change is followed
    assert recent.value(0.4) == 2e-4
    for k in range(15):
        recent.add(0.5, now=1.0 + k * 0.01)  # a slow spell (Redis stalled)...
    assert recent.value(1.2) == 0.5
    assert recent.value(2.5) == 0.0  # ...then nothing for over a second: unknown, nothing shed on it
    recent.add(1e-4, now=2.6)  # the next measurement stands alone: the slow spell has aged out
    assert recent.value(2.6) == 1e-4


def test_explained_requests_are_shed_first_and_answered_last(ranker: Ranker, redis_url: str) -> None:
    """An explained request needs its expected wait (its explaining work included) to fit in a quarter of
    the time left, a plain one in half: at a deadline between the two, the explained one is refused
    (reason `explain`) and the plain one admitted. In a shared batch the plain request is answered
    before the explaining graph runs."""

    async def go() -> None:
        async with running(ranker, redis_url, max_delay_s=0.05) as b:
            hist = ["i4", "i5", "i6"]
            order: list[str] = []
            calls = {
                name: asyncio.ensure_future(b.submit(name, ["i2", "i3"], hist, explain=name == "explained"))
                for name in ("explained", "plain")
            }
            for name, call in calls.items():
                call.add_done_callback(lambda _, name=name: order.append(name))
            got = {name: await call for name, call in calls.items()}
            assert order == ["plain", "explained"] and b.batches == 1  # one batch, the plain answered first
            assert got["plain"].explanation is None
            why = got["explained"].explanation
            assert why is not None and why.contribution.shape == why.attention.shape == (2, 3)
            np.testing.assert_array_equal(got["explained"].scores, got["plain"].scores)

            for _ in range(15):  # a known cost: 1 ms a candidate, nothing else (the medians of 15)
                b.costs.candidate_s.add(0.001)
                b.costs.redis_s.add(0.0)
                b.costs.explain_row_s.add(0.0)
            cands = [f"i{k}" for k in range(2, 12)]  # 10 candidates: an expected wait of 10 ms
            deadline = time.perf_counter() + 0.030  # plain: 2 x 10 ms fits; explained: 4 x 10 ms does not
            with pytest.raises(Overloaded) as shed:
                await b.submit("x", cands, hist, deadline, explain=True)
            assert shed.value.extra["reason"] == "explain" and "without explain" in str(shed.value)
            assert b.admits(deadline, len(cands))  # the same request without explain is admitted
            assert sample(b, "din_queue_rejections_total", {"reason": "explain"}) == 1
            assert sample(b, "din_queue_rejections_total", {"reason": "deadline"}) == 0

    run(go)


def test_every_answer_carries_the_history_it_was_scored_on_and_its_version(
    ranker: Ranker, redis_url: str
) -> None:
    """What a writer of impressions logs: the snapshot the model saw (from Redis or the request, cut to
    T, empty when degraded) and the version that scored it, explained or not."""
    T = ranker.max_history
    long = [f"i{k}" for k in range(2, 2 + T + 5)]

    async def go() -> None:
        async with running(ranker, redis_url, max_delay_s=0.05) as b:
            await b.store.append_events([("snap", "i7"), ("snap", "i8")], 100)  # type: ignore[attr-defined]
            stored, given, explained = await asyncio.gather(
                b.submit("snap", ["i2"], None),
                b.submit("x", ["i2", "i3"], long),
                b.submit("x", ["i2", "i3"], ["i4", "i5"], explain=True),
            )
            assert stored.history == ("i8", "i7")  # newest first, as read
            assert given.history == tuple(long[:T]) and given.history_length == T
            assert explained.explanation is not None and explained.history == ("i4", "i5")
            assert {r.model_version for r in (stored, given, explained)} == {ranker.model_version}
        async with running(ranker, f"redis://127.0.0.1:{free_port()}/0", max_delay_s=0.01) as b:
            cold = await b.submit("snap", ["i2"], None)  # nothing listens there: degraded
            assert cold.degraded == "redis_unavailable" and cold.history == ()
            assert cold.model_version == ranker.model_version

    run(go)
