"""Micro-batcher: concurrent /rank requests share one Redis round trip and one ONNX Runtime call.

The shape of text-embeddings-inference's queue and Ray Serve's `@serve.batch`:
- each request carries an asyncio future and waits in a bounded deque; a full queue refuses at once;
- one consumer task owns the deque. It closes a batch when the queued candidates fill the budget, or
  when the oldest request has waited `max_delay` *and* an inference slot is free (while every slot is
  busy, requests keep queueing, and the next batch grows instead of waiting in line half empty).
  Closing takes requests off the front while they fit; the first that does not fit stays at the
  front and opens the next batch;
- a batch then goes through small steps: drop callers that went away, read every missing history
  in one pipelined round trip (Redis down: empty histories, marked degraded), run the model in one
  of `workers` threads while the consumer already collects the next batch, deliver. Workers call one
  ONNX Runtime session side by side (one intra-op thread each by default): on 2 cores two batches at
  once served 16-25% more requests than one batch split across both cores, which stalls at every
  parallel section whenever the event loop takes a core;
- a batch takes the live model once (`LiveModel.current`) and uses it from start to end;
- a failed batch sets the error on every future of that batch;
- explanations come last: a batch is scored (ctr alone), every request that did not ask for an
  explanation gets its answer, and only then do the explaining ones (not degraded, still waiting) go
  through the explaining graph together, one call for the items each returns (`Ranker.explain_batch`).

Deadlines (admission control): every request carries its deadline. At the door, a request whose
expected wait (the candidates ahead of it, drained by `workers` calls at once, and its own, at the
median cost per candidate of recent calls, plus a Redis read) would not fit in half the time left
is shed at once with 503 overloaded + Retry-After, instead of queueing work that would be late
anyway; so the queue never holds more than half a budget's worth of work. A caller stops waiting
at its deadline (503 overloaded, reason timeout), and a request whose deadline has passed is
dropped when its batch is taken: it is never computed.

Explained requests are a debugging tool and are shed first: their expected wait counts their own
explaining work (items returned x behaviours, at the measured cost per row) and must fit in a quarter
of the time left, not half (503 overloaded, reason `explain`), so under load they are refused while
the requests that do not explain are still admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from contracts.errors import DinError, InferenceFailed, Overloaded, ShuttingDown, StoreUnavailable
from service.live import LiveModel
from service.metrics import Metrics
from service.ranker import Explained, Ranker, Scored, ranked

log = logging.getLogger(__name__)
_R = TypeVar("_R", list[Scored], list[Explained])

_SHUTTING_DOWN = "the service is shutting down; retry on another replica"
_CANNOT_MEET_DEADLINE = "the service cannot answer within the request's deadline"
# Admission: the expected wait must fit in half the time left. The queue then holds at most half a
# budget of work: enough to keep every worker busy (a batch takes ~10-30 ms), with the other half for
# what the estimate cannot see (a slow call, an event loop busy refusing, the time a request spent in
# the socket before it was read). Filling the queue to the deadline adds latency, not goodput: at 2x
# capacity it answered 200s at p50 190 ms and some past 250 ms by the client's clock (bench/overload.py).
_HEADROOM = 2.0
_EXPLAIN_HEADROOM = 4.0  # explained requests: a quarter of the time left, so they are shed first
_EXPLAIN_SHED = (
    "explanations are shed first under load and this one would not fit its deadline; retry shortly, "
    "or rank without explain"
)


class HistorySource(Protocol):
    async def get_histories(
        self, user_ids: list[str], max_history: int
    ) -> list[list[str] | StoreUnavailable]: ...  # per user: the history, or why it could not be read


@dataclass(frozen=True, slots=True)
class Explanation:
    """What an explained request's returned items owe to each behaviour the model saw."""

    order: np.ndarray  # int (n_returned,): the returned items as indices of the candidates, best first
    history: list[str]  # the behaviours the model saw, newest first (cut to T)
    attention: np.ndarray  # float32 (n_returned, len(history)): each behaviour's pooling weight
    contribution: np.ndarray  # float32 (n_returned, len(history)): ctr - ctr without that behaviour


@dataclass(frozen=True, slots=True)
class RankResult:
    scores: np.ndarray  # float32 (n_candidates,), in the request's candidate order
    history_length: int  # behaviours the model saw, after truncation to T
    degraded: str | None  # why the history could not be read, or None
    model_version: str  # the model that computed these scores
    explanation: Explanation | None = None  # with explain, unless degraded


@dataclass(slots=True)
class _Job:
    user_id: str
    candidates: list[str]
    history: list[str] | None  # explicit history: skips the Redis read
    future: asyncio.Future[RankResult]
    enqueued_at: float  # time.perf_counter()
    deadline: float  # time.perf_counter() by which the answer is due
    explain: bool = False  # wants each returned item's contributions
    top_k: int | None = None  # with explain: how many items it returns (None: every candidate)
    explain_rows: int = 0  # with explain: the explaining graph's rows it needs (items x T), for admission


class Batcher:
    def __init__(
        self,
        live: LiveModel,
        store: HistorySource,
        metrics: Metrics,
        *,
        max_delay_s: float,
        max_candidates: int,
        queue_max: int,
        max_inflight: int = 1,
        workers: int = 1,
    ) -> None:
        self.live = live
        self.store = store
        self.metrics = metrics
        self.max_delay_s = max_delay_s
        self.max_candidates = max_candidates
        self.queue_max = queue_max
        self.max_inflight = max(max_inflight, workers)
        self.workers = workers
        self._queue: deque[_Job] = deque()
        self._queued_candidates = 0
        self._wakeup = asyncio.Event()  # a job arrived or a slot freed: the consumer looks again
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumer: asyncio.Task[None] | None = None
        # ONNX Runtime runs `workers` batches at a time (one session, run concurrently from that many
        # threads); with max_inflight > workers the next batch reads its histories from Redis meanwhile,
        # so the model never waits for a round trip.
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="din-infer", initializer=_yield_to_event_loop
        )
        self._closing = False
        self.batches = 0  # ONNX Runtime calls made (also in the metrics' histogram count)
        # Recent costs, for the expected wait of a new request: the median of the last few batches, so
        # one slow call (a VM stall, a page fault storm) does not shed a burst of requests that fit.
        self._candidate_s = _RecentMedian()  # inference seconds per candidate, batch overhead spread over it
        self._explain_row_s = _RecentMedian()  # explaining-graph seconds per (item, behaviour) row
        self._explain_rows = 0  # explaining work admitted and not yet done, in rows
        self._redis_s = _RecentMedian()  # one pipelined history read
        self._inflight_candidates = 0
        self._typical_candidates = 0  # candidates of a recent request (moving average)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._consumer = asyncio.create_task(self._consume(), name="din-batcher")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, let running batches finish, fail whatever still waits."""
        self._closing = True
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDown(_SHUTTING_DOWN))
        self._queued_candidates = 0
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ---------------------------------------------------------------- producer side

    @property
    def depth(self) -> int:
        return len(self._queue)

    def admits(self, deadline: float, candidates: int | None = None, explain_rows: int = 0) -> bool:
        """Whether a request of `candidates` (default: a typical one), explaining `explain_rows` rows,
        can be answered by `deadline` (time.perf_counter()), with headroom: an estimate a little
        optimistic would admit work that then times out; an explained request gets twice the headroom,
        so it is shed first. The one admission rule, used here and at the door (service.middleware)."""
        n = self._typical_candidates if candidates is None else candidates
        headroom = _EXPLAIN_HEADROOM if explain_rows else _HEADROOM
        return time.perf_counter() + headroom * self.expected_wait(n, explain_rows) <= deadline

    def expected_wait(self, candidates: int, explain_rows: int = 0) -> float:
        """Seconds until a new request of `candidates` (explaining `explain_rows` rows) would be
        answered: the work ahead of it and its own, at the recent cost per candidate and per explained
        row, plus a Redis read. 0 until a batch has been measured."""
        ahead = self._inflight_candidates + self._queued_candidates
        # the work ahead drains `workers` batches at a time; its own batch takes one call's time
        scoring = (ahead / self.workers + candidates) * self._candidate_s.value()
        explaining = (self._explain_rows / self.workers + explain_rows) * self._explain_row_s.value()
        return scoring + explaining + self._redis_s.value()

    async def submit(
        self,
        user_id: str,
        candidates: list[str],
        history: list[str] | None,
        deadline: float | None = None,
        *,
        explain: bool = False,
        top_k: int | None = None,
    ) -> RankResult:
        """Queue one request and wait for its scores (and with `explain`, the contributions behind the
        best `top_k` of them, or all), until `deadline` (time.perf_counter()).

        Raises Overloaded at once when the queue is full or the request cannot be answered by its
        deadline (an explained one: with its explaining work, in a quarter of the time left), and when
        the deadline passes while it waits."""
        if self._closing:
            raise ShuttingDown(_SHUTTING_DOWN)
        now = time.perf_counter()
        deadline = deadline if deadline is not None else now + 3600.0
        if len(self._queue) >= self.queue_max:
            raise self.shed("queue_full", f"the ranking queue is full ({self.queue_max} requests waiting)")
        if not self.admits(deadline, len(candidates)):
            raise self.shed("deadline", _CANNOT_MEET_DEADLINE)
        returned = len(candidates) if top_k is None else min(top_k, len(candidates))
        rows = returned * self.live.current.max_history if explain else 0
        if explain and not self.admits(deadline, len(candidates), rows):
            raise self.shed("explain", _EXPLAIN_SHED)
        self._typical_candidates = round(_ewma(self._typical_candidates, len(candidates)))
        future: asyncio.Future[RankResult] = asyncio.get_running_loop().create_future()
        job = _Job(user_id, candidates, history, future, now, deadline, explain, top_k, rows)
        self._queue.append(job)
        self._queued_candidates += len(candidates)
        self._explain_rows += rows
        self._wakeup.set()
        self.metrics.queue_admitted.inc()
        self.metrics.queue_depth.set(len(self._queue))
        try:
            # a caller that goes away (or times out) cancels the future; the batcher skips it
            async with asyncio.timeout(deadline - time.perf_counter()):
                return await job.future
        except TimeoutError:
            raise self.shed("timeout", "the request's deadline passed before it could be answered") from None

    def shed(self, reason: str, message: str = _CANNOT_MEET_DEADLINE) -> Overloaded:
        """Count a refusal and return its answer (503 overloaded, Retry-After); raised here, and
        answered by the AdmissionGate (service.middleware) for requests refused before parsing."""
        self.metrics.queue_rejections.labels(reason=reason).inc()
        return Overloaded(f"{message}; retry shortly", reason=reason, retry_after_s=1)

    # ---------------------------------------------------------------- consumer: collect

    async def _consume(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:  # every job taken had been cancelled by its caller
                continue
            self._inflight += 1
            self.metrics.inflight_batches.set(self._inflight)
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _next_batch(self) -> list[_Job]:
        """Wait until a batch should close, then take it off the front of the queue."""
        while True:
            timeout: float | None = None  # nothing queued, or every slot busy: wait for news
            if self._queue and self._inflight < self.max_inflight:
                if self._queued_candidates >= self.max_candidates:
                    break
                timeout = self._queue[0].enqueued_at + self.max_delay_s - time.perf_counter()
                if timeout <= 0:
                    break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
        return self._take()

    def _take(self) -> list[_Job]:
        """Jobs off the front while they fit the candidate budget (the first always does)."""
        batch: list[_Job] = []
        size = 0
        while self._queue:
            job = self._queue[0]
            n = len(job.candidates)
            if batch and size + n > self.max_candidates:
                break  # stays at the front: it opens the next batch
            self._queue.popleft()
            self._queued_candidates -= n
            if job.future.done():  # the caller went away (or gave up at its deadline) while queued
                self._explain_rows -= job.explain_rows
                self.metrics.cancelled.inc()
                continue
            if job.deadline <= time.perf_counter():  # too late: never computed
                self._explain_rows -= job.explain_rows
                self.metrics.queue_rejections.labels(reason="expired").inc()
                late = Overloaded("the request's deadline passed in the queue", reason="timeout")
                job.future.set_exception(late)
                continue
            batch.append(job)
            size += n
        self.metrics.queue_depth.set(len(self._queue))
        self._inflight_candidates += size
        return batch

    # ---------------------------------------------------------------- a batch, step by step

    async def _run(self, batch: list[_Job]) -> None:
        try:
            await self._run_batch(batch)
        finally:
            self._inflight_candidates -= sum(len(job.candidates) for job in batch)
            self._explain_rows -= sum(job.explain_rows for job in batch)
            self._inflight -= 1
            self.metrics.inflight_batches.set(self._inflight)
            self._wakeup.set()

    async def _run_batch(self, batch: list[_Job]) -> None:
        now = time.perf_counter()
        for job in batch:
            self.metrics.queue_latency.observe(now - job.enqueued_at)
        try:
            ranker = self.live.current  # this batch's model, from start to end
            t_read = time.perf_counter()
            # Redis gets what is left of the budget: past the last deadline, nobody waits for the answer.
            async with asyncio.timeout(max(job.deadline for job in batch) - t_read):
                histories, degraded = await self._read_histories(batch, ranker.max_history)
            self._redis_s.add(time.perf_counter() - t_read)
            jobs = self._still_waiting(batch)  # callers may have gone during the Redis read
            if not jobs:
                return
            if not ranker.can_explain:  # a bundle without explain.onnx (after a reload, say) explains nothing
                jobs = [i for i in jobs if not self._refuse_explain(batch[i], ranker)]
            histories = [histories[i] for i in jobs]
            degraded = [degraded[i] for i in jobs]
            live = [batch[i] for i in jobs]
            if not live:
                return
            scores = await self._infer(ranker, live, histories)
        except TimeoutError:  # the Redis read outlived every caller's deadline
            self._fail(batch, Overloaded("the request's deadline passed", reason="timeout"))
            return
        except Exception as e:
            self._fail(batch, e)
            return
        T = ranker.max_history
        explaining: list[tuple[_Job, list[str], np.ndarray]] = []
        for job, hist, s, why in zip(live, histories, scores, degraded, strict=True):
            if job.future.done():
                continue
            if job.explain and why is None:  # a degraded answer explains nothing: answered at once
                explaining.append((job, hist[:T], s.scores))
            else:
                job.future.set_result(RankResult(s.scores, min(len(hist), T), why, ranker.model_version))
        if explaining:  # every other request of the batch has its answer by now
            await self._explain(ranker, explaining)

    async def _explain(self, ranker: Ranker, work: list[tuple[_Job, list[str], np.ndarray]]) -> None:
        """One call of the explaining graph for the items each explaining request returns (the order
        `/rank` returns them in: `ranked`), then their answers. A failure fails these requests only."""
        work = [w for w in work if not w[0].future.done()]  # callers may have gone (or timed out)
        if not work:
            return
        orders = [ranked(scores, job.top_k) for job, _, scores in work]
        rows = [
            ([job.candidates[i] for i in order], hist)
            for (job, hist, _), order in zip(work, orders, strict=True)
        ]
        try:
            loop = asyncio.get_running_loop()
            explained, seconds = await loop.run_in_executor(
                self._executor, functools.partial(_timed, ranker.explain_batch, rows)
            )
        except Exception as e:  # logged with its cause; the callers get InferenceFailed (or the DinError)
            self._fail([job for job, _, _ in work], e)
            return
        self._explain_row_s.add(seconds / max(1, sum(len(items) * len(hist) for items, hist in rows)))
        for (job, hist, scores), order, ex in zip(work, orders, explained, strict=True):
            if not job.future.done():
                why = Explanation(order, hist, ex.attention, ex.contribution)
                job.future.set_result(RankResult(scores, len(hist), None, ranker.model_version, why))

    @staticmethod
    def _refuse_explain(job: _Job, ranker: Ranker) -> bool:
        if job.explain and not job.future.done():
            job.future.set_exception(ranker.cannot_explain())
        return job.explain

    def _still_waiting(self, batch: list[_Job]) -> list[int]:
        keep = [i for i, job in enumerate(batch) if not job.future.done()]
        if len(keep) < len(batch):
            self.metrics.cancelled.inc(len(batch) - len(keep))
        return keep

    async def _read_histories(
        self, jobs: list[_Job], max_history: int
    ) -> tuple[list[list[str]], list[str | None]]:
        """Explicit histories as given (never degraded: they do not touch Redis); the others from
        Redis in one pipelined round trip. Per job: its history, and why it is degraded (or None).
        Redis down degrades every job that needed it; a key that cannot be read degrades its job alone."""
        histories: list[list[str]] = [job.history or [] for job in jobs]
        degraded: list[str | None] = [None] * len(jobs)
        need = [i for i, job in enumerate(jobs) if job.history is None]
        if not need:
            return histories, degraded
        t0 = time.perf_counter()
        try:
            got = await self.store.get_histories([jobs[i].user_id for i in need], max_history)
        except StoreUnavailable as e:
            self.metrics.degraded.labels(reason="redis_unavailable").inc(len(need))
            log.warning("redis unavailable, ranking %d requests with empty histories: %s", len(need), e)
            for i in need:
                degraded[i] = "redis_unavailable"
            return histories, degraded
        finally:
            self.metrics.redis_latency.labels(op="get_histories").observe(time.perf_counter() - t0)
        for i, hist in zip(need, got, strict=True):
            if isinstance(hist, StoreUnavailable):
                self.metrics.degraded.labels(reason="history_unreadable").inc()
                log.warning("history of %r unreadable, ranking with an empty one: %s", jobs[i].user_id, hist)
                degraded[i] = "history_unreadable"
            else:
                histories[i] = hist
        return histories, degraded

    async def _infer(self, ranker: Ranker, jobs: list[_Job], histories: list[list[str]]) -> list[Scored]:
        """One ONNX Runtime call for the whole batch (ctr alone), in a worker thread."""
        rows = [(job.candidates, hist) for job, hist in zip(jobs, histories, strict=True)]
        n_cand = sum(len(c) for c, _ in rows)
        try:
            loop = asyncio.get_running_loop()
            scores, seconds = await loop.run_in_executor(
                self._executor, functools.partial(_timed, ranker.score_batch, rows)
            )
        except Exception as e:
            # the detail is logged (with the request ids of the batch), never sent to clients
            raise InferenceFailed(f"inference failed for a batch of {len(rows)} requests") from e
        self.metrics.inference_latency.observe(seconds)
        self._candidate_s.add(seconds / max(1, n_cand))
        self.metrics.batch_requests.observe(len(rows))
        self.metrics.batch_candidates.observe(n_cand)
        self.metrics.candidates_scored.inc(n_cand)
        self.batches += 1
        return scores

    def _fail(self, jobs: list[_Job], e: Exception) -> None:
        err = e if isinstance(e, DinError) else InferenceFailed("the batch failed")
        self.metrics.batch_failures.labels(reason=err.code).inc()
        log.error("batch of %d requests failed: %s", len(jobs), err, exc_info=e)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(err)


def _yield_to_event_loop() -> None:
    """Run this inference worker at a lower CPU priority (nice +5; Linux threads have their own): with
    a worker busy on every core, the event loop still gets a core at once when a request arrives, so a
    refusal or an answer is not held behind a batch's time slice."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)


def _timed(fn: Callable[..., _R], *args: Any, **kwargs: Any) -> tuple[_R, float]:
    """Run `fn` and time it where it runs (a worker thread): not the wait for a free worker."""
    t0 = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t0


class _RecentMedian:
    """The median of the last `size` samples of the last `max_age` seconds; 0 (unknown) before the
    first and once the newest is older than `max_age`. An estimate nobody has confirmed for a while is
    not trusted: when everything is being shed no batch runs to measure anything, and a stale high
    estimate (a Redis stall that has since ended) would otherwise shed every request for ever."""

    def __init__(self, size: int = 15, max_age: float = 1.0) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=size)
        self.max_age = max_age
        self._value = 0.0

    def add(self, sample: float, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self._samples.append((now, sample))
        while self._samples[0][0] < now - self.max_age:
            self._samples.popleft()
        self._value = statistics.median(v for _, v in self._samples)

    def value(self, now: float | None = None) -> float:
        now = time.perf_counter() if now is None else now
        fresh = self._samples and self._samples[-1][0] >= now - self.max_age
        return self._value if fresh else 0.0


def _ewma(previous: float, sample: float, weight: float = 0.2) -> float:
    """Exponential moving average; the first sample stands alone."""
    return sample if previous == 0.0 else (1 - weight) * previous + weight * sample
