"""Inference, the second half of the micro-batcher (`service.rank_queue` is the first): a batch the
queue closed goes through small steps here. Drop callers that went away; read every missing history
in one pipelined round trip (Redis down: empty histories, marked degraded; a read that has not
answered when only the batch's own inference time is left of its budget is not waited for: the batch
is answered degraded, in time, and the read ends on its own); run the model in one of `workers`
threads while the consumer already collects the next batch; deliver.

- Workers call one ONNX Runtime session side by side (one intra-op thread each by default): on 2
  cores two batches at once served 16-25% more requests than one batch split across both cores,
  which stalls at every parallel section whenever the event loop takes a core.
- A batch is one member's (`Job.model`, the queue's lane): it takes that member's model once
  (`LiveModel.current`) and uses it from start to end; its costs are measured into that member's.
- A failed batch sets the error on every future of that batch.
- Explanations come last: a batch is scored (ctr alone), every request that did not ask for an
  explanation gets its answer, and only then do the explaining ones (not degraded, still waiting) go
  through the explaining graph together, one call for the items each returns (`Ranker.explain_batch`).
- Every answer (`RankResult`) carries the history it was scored on and the version that scored it,
  explained or not: what a writer of impressions logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from contracts.errors import DinError, InferenceFailed, StoreUnavailable
from service.explain import Explanation
from service.live import LiveModel, ModelSet
from service.metrics import Metrics
from service.rank_queue import HEADROOM, Job
from service.ranker import Explained, Ranker, Scored, ranked

log = logging.getLogger(__name__)
_R = TypeVar("_R", list[Scored], list[Explained])
_READ_RESERVE = 0.25  # of a batch's time left, kept from the Redis read for inference and delivery


class HistorySource(Protocol):
    async def get_histories(
        self, user_ids: list[str], max_history: int
    ) -> list[list[str] | StoreUnavailable]: ...  # per user: the history, or why it could not be read


@dataclass(frozen=True, slots=True)
class RankResult:
    scores: np.ndarray  # float32 (n_candidates,), in the request's candidate order
    history_length: int  # behaviours the model saw, after truncation to T
    degraded: str | None  # why the history could not be read, or None
    model_version: str  # the model that computed these scores
    explanation: Explanation | None = None  # with explain, unless degraded
    history: tuple[str, ...] = ()  # the behaviours the model saw, newest first (cut to T): the snapshot
    scorer: Ranker | None = None  # the model that scored it (the impression log reads its categories)
    scored: Scored | None = None  # the row as the graph saw it (its indices): the log's categories


class Inference:
    def __init__(self, models: ModelSet, store: HistorySource, metrics: Metrics, *, workers: int):
        self.models = models
        self.store = store
        self.metrics = metrics
        # ONNX Runtime runs `workers` batches at a time (one session, run concurrently from that many
        # threads); with more batches in flight than workers the next batch reads its histories from
        # Redis meanwhile, so the model never waits for a round trip.
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="din-infer", initializer=_yield_to_event_loop
        )
        self.batches = 0  # ONNX Runtime calls made (also in the metrics' histogram count)
        # told the number of graph calls running (or waiting for a thread) after each change: what the
        # shadows give way to (service.shadow_worker.ServedWork)
        self.on_scoring: Callable[[int], None] | None = None
        self._scoring = 0

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def run(self, batch: list[Job]) -> None:
        """Score `batch` (one member's) and answer every job of it that still waits."""
        member = self.models.get(batch[0].model)
        now = time.perf_counter()
        for job in batch:
            self.metrics.queue_latency.observe(now - job.enqueued_at)
        try:
            ranker = member.current  # this batch's model, from start to end
            t_read = time.perf_counter()
            # Redis gets what is left of the budget once this batch's own inference is set aside (twice
            # its estimate, and at least a quarter of the time left: estimates of small batches are
            # rough, and the answer has to travel): a read slower than that would make every answer
            # late, so the batch goes on degraded.
            last = max(job.deadline for job in batch)
            n_cand = sum(len(job.candidates) for job in batch)
            inference = HEADROOM * n_cand * member.costs.candidate_s.value()
            read_by = last - max(inference, _READ_RESERVE * (last - t_read), 0.005)
            histories, degraded = await self._read_histories(member, batch, ranker.max_history, read_by)
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
            scores = await self._infer(member, ranker, live, histories)
        except Exception as e:
            self._fail(batch, e)
            return
        T = ranker.max_history
        explaining: list[tuple[Job, list[str], np.ndarray]] = []
        for job, hist, s, why in zip(live, histories, scores, degraded, strict=True):
            if job.future.done():
                continue
            if job.explain and why is None:  # a degraded answer explains nothing: answered at once
                explaining.append((job, hist[:T], s.scores))
            else:
                seen = tuple(hist[:T])
                job.future.set_result(
                    RankResult(s.scores, len(seen), why, ranker.model_version, None, seen, ranker, s)
                )
        if explaining:  # every other request of the batch has its answer by now
            await self._explain(member, ranker, explaining)

    async def _explain(
        self, member: LiveModel, ranker: Ranker, work: list[tuple[Job, list[str], np.ndarray]]
    ) -> None:
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
            explained, seconds = await self._graph_call(loop, ranker.explain_batch, rows)
        except Exception as e:  # logged with its cause; the callers get InferenceFailed (or the DinError)
            self._fail([job for job, _, _ in work], e)
            return
        member.costs.explain_row_s.add(seconds / max(1, sum(len(items) * len(hist) for items, hist in rows)))
        for (job, hist, scores), order, ex in zip(work, orders, explained, strict=True):
            if not job.future.done():
                why = Explanation(order, hist, ex.attention, ex.contribution)
                result = RankResult(scores, len(hist), None, ranker.model_version, why, tuple(hist), ranker)
                job.future.set_result(result)

    @staticmethod
    def _refuse_explain(job: Job, ranker: Ranker) -> bool:
        if job.explain and not job.future.done():
            job.future.set_exception(ranker.cannot_explain())
        return job.explain

    def _still_waiting(self, batch: list[Job]) -> list[int]:
        keep = [i for i, job in enumerate(batch) if not job.future.done()]
        if len(keep) < len(batch):
            self.metrics.cancelled.inc(len(batch) - len(keep))
        return keep

    async def _read_histories(
        self, member: LiveModel, jobs: list[Job], max_history: int, read_by: float
    ) -> tuple[list[list[str]], list[str | None]]:
        """Explicit histories as given (never degraded: they do not touch Redis); the others from
        Redis in one pipelined round trip. Per job: its history, and why it is degraded (or None).
        Redis down, or no answer by `read_by` (time.perf_counter()), degrades every job that needed
        it; a key that cannot be read degrades its job alone. A read not waited for goes on in the
        background (its connection is not cut mid-reply), and how it ends still reaches the store's
        breaker: a Redis that is gone opens it, and the next batches do not ask at all."""
        histories: list[list[str]] = [job.history or [] for job in jobs]
        degraded: list[str | None] = [None] * len(jobs)
        need = [i for i, job in enumerate(jobs) if job.history is None]
        if not need:
            return histories, degraded
        t0 = time.perf_counter()
        read = asyncio.ensure_future(self.store.get_histories([jobs[i].user_id for i in need], max_history))
        try:
            try:
                await asyncio.wait({read}, timeout=max(0.0, read_by - t0))
            finally:
                if not read.done():  # not waited for (or this batch was cancelled)
                    read.add_done_callback(_ignore_outcome)
            if not read.done():
                raise StoreUnavailable("no answer from redis within the batch's budget (not waited for)")
            got = read.result()
            # what a read costs, for admission: only reads Redis answered (one that failed or was not
            # waited for cost its batch at most the bound above, and the breaker spares the next ones)
            member.costs.redis_s.add(time.perf_counter() - t0)
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

    async def _infer(
        self, member: LiveModel, ranker: Ranker, jobs: list[Job], histories: list[list[str]]
    ) -> list[Scored]:
        """One ONNX Runtime call for the whole batch (ctr alone), in a worker thread."""
        rows = [(job.candidates, hist) for job, hist in zip(jobs, histories, strict=True)]
        n_cand = sum(len(c) for c, _ in rows)
        try:
            loop = asyncio.get_running_loop()
            scores, seconds = await self._graph_call(loop, ranker.score_batch, rows)
        except Exception as e:
            # the detail is logged (with the request ids of the batch), never sent to clients
            raise InferenceFailed(f"inference failed for a batch of {len(rows)} requests") from e
        self.metrics.inference_latency.observe(seconds)
        member.costs.candidate_s.add(seconds / max(1, n_cand))
        self.metrics.model_batches.labels(model=member.name, model_version=ranker.model_version).inc()
        self.metrics.batch_requests.observe(len(rows))
        self.metrics.batch_candidates.observe(n_cand)
        self.metrics.candidates_scored.inc(n_cand)
        self.batches += 1
        return scores

    async def _graph_call(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[[Any], _R], rows: Any
    ) -> tuple[_R, float]:
        """`fn(rows)` in a worker thread, timed; counted in `on_scoring` while it runs."""
        self._scoring += 1
        if self.on_scoring is not None:
            self.on_scoring(self._scoring)
        try:
            return await loop.run_in_executor(self._executor, functools.partial(_timed, fn, rows))
        finally:
            self._scoring -= 1
            if self.on_scoring is not None:
                self.on_scoring(self._scoring)

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        err = e if isinstance(e, DinError) else InferenceFailed("the batch failed")
        self.metrics.batch_failures.labels(reason=err.code).inc()
        log.error("batch of %d requests failed: %s", len(jobs), err, exc_info=e)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(err)


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    """A read nobody waits for any more: its outcome (already seen by the store) is dropped."""
    if not task.cancelled():
        task.exception()


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
